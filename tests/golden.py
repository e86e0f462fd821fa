"""Golden results: every method's metrics and final states on the smoke recipe, recorded by one version of the
code and compared by later ones (tests/test_golden.py). A refactoring that claims to change no arithmetic
must reproduce these: integers exactly, floats to the last few bits (another CPU's kernels sum in another
order, so float32 results differ there in the last bits; a changed formula or setting moves them far more).
States are recorded per tensor as shape, float64 sum and L2 norm.

    .venv/bin/python -m tests.golden            # rewrite tests/golden_smoke.json (only when results change
                                                # on purpose; say why in the commit message)
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from pfl import config, rundir
from pfl.build import Hardware
from pfl.federation import Callbacks

GOLDEN = Path(__file__).with_name("golden_smoke.json")
SMOKE = Path(__file__).parents[1] / "recipes" / "smoke.toml"
# columns that are measured wall-clock time: the only ones allowed to differ between runs
TIMING = ("train_seconds", "eval_seconds")

METHODS = ("standalone", "fedavg", "lg_fedavg", "fd", "fml", "fedkd", "fedproto", "fedgh", "fedtgp", "fedmrl",
           "pfedes", "fedssa", "pfedafm", "pfedlora", "fedgen", "fedl2g")
# settings whose code paths the defaults do not take
VARIANTS = {
    "pfedlora-mu-lr-global": {"pfedlora.mu": 0.5, "pfedlora.adapter_lr": 0.05, "pfedlora.inference_adapter": "global"},
    "pfedlora-round-start-val": {"evaluate_at": "round_start", "val_fraction": 0.2},
    "fedproto-prototype": {"method": "fedproto", "fedproto.inference": "prototype"},
    "fedgh-global": {"method": "fedgh", "fedgh.inference": "global"},
    "fedl2g-logit": {"method": "fedl2g", "fedl2g.variant": "logit"},
    "fedavg-partial-median": {"method": "fedavg", "model_setting": "homogeneous", "participation": 0.5,
                              "aggregation": "median"},
}


def cases() -> dict[str, dict[str, Any]]:
    out = {m: {"method": m, **({"model_setting": "homogeneous"} if m == "fedavg" else {})} for m in METHODS}
    for name, over in VARIANTS.items():
        out[name] = {"method": "pfedlora", **over}
    return out


class _Rows(Callbacks):
    def __init__(self):
        self.rows: list[dict[str, Any]] = []

    def on_round_end(self, record):
        self.rows.append({k: v for k, v in record.items() if k not in TIMING})


def _digest(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    out = {}
    for k, v in sorted(tensors.items()):
        x = v.detach().to(torch.float64)
        out[k] = {"dtype": str(v.dtype), "shape": list(v.shape), "sum": x.sum().item(), "norm": x.norm().item()}
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def record(name: str, overrides: dict[str, Any], root: Path) -> dict[str, Any]:
    """One case: the smoke recipe with `overrides`, on the local engine, CPU, 32-bit, one thread."""
    from pfl.run import train

    raw, _ = config.read_recipe_file(str(SMOKE))
    cfg = config.resolve(raw, overrides)
    rows = _Rows()
    out = root / name
    train(cfg, out, Hardware(threads=1), callbacks=rows)
    states = {"global": _digest(rundir.load_global_state(out))}
    for k in range(cfg.num_clients):
        states[f"client{k}"] = _digest(rundir.load_tensors(rundir.client_state_path(out, k)))
    metrics = [{k: _plain(v) for k, v in row.items()} for row in rows.rows]
    return {"metrics": metrics, "states": states}


def record_all(names: list[str] | None = None) -> dict[str, Any]:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        return {name: record(name, over, Path(tmp)) for name, over in cases().items()
                if names is None or name in names}


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(record_all(sys.argv[1:] or None), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
