import os

import pytest

os.environ.setdefault("PYTHONHASHSEED", "0")

from pfl import config  # noqa: E402
from pfl.federation.engine import quiet_lightning  # noqa: E402

quiet_lightning()

SMOKE = {
    "dataset": "synthetic", "partition": "pathological", "classes_per_client": 2, "num_clients": 4,
    "participation": 1.0, "rounds": 2, "batch_size": 32, "eval_every": 1, "seed": 0,
    "synthetic.num_samples": 400, "synthetic.num_classes": 4, "synthetic.image_shape": [1, 16, 16],
}


@pytest.fixture
def make_cfg():
    """A validated synthetic config; keyword overrides use dotted keys via a dict: make_cfg({'pfedlora.rank': 4})."""

    def _make(overrides: dict | None = None):
        return config.resolve({**SMOKE, **(overrides or {})})

    return _make
