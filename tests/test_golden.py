"""Every method's metrics and final states on the smoke recipe equal the golden file recorded by an earlier
version of the code (tests/golden.py): refactorings of the method seam and the engines change no arithmetic.
Integers (bytes, FLOPs, counts) must match exactly; floats to a relative 1e-6 (metrics) and 1e-4 (state sums
and norms after three rounds of training), which absorbs another CPU's summation order and nothing more."""

import json
import math

import pytest

from tests import golden

EXPECTED = json.loads(golden.GOLDEN.read_text())


def _close(got, want, rel: float, where: str) -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), f"{where}: keys {sorted(set(got) ^ set(want))}"
        for k in want:
            _close(got[k], want[k], rel, f"{where}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, rel, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert isinstance(got, float) and math.isclose(got, want, rel_tol=rel, abs_tol=1e-9), \
            f"{where}: {got!r} != {want!r}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def test_the_golden_file_covers_every_method_and_variant():
    from pfl.algorithms import ALGORITHMS

    assert set(EXPECTED) == set(golden.cases())
    assert set(golden.METHODS) == set(ALGORITHMS)


def test_the_comparison_tells_a_changed_number():
    _close({"a": [1.0, 2]}, {"a": [1.0 + 1e-9, 2]}, 1e-6, "x")
    for got in ({"a": [1.001, 2]}, {"a": [1.0, 3]}, {"a": [1.0]}, {"b": [1.0, 2]}):
        with pytest.raises(AssertionError):
            _close(got, {"a": [1.0, 2]}, 1e-6, "x")


@pytest.mark.parametrize("name", sorted(golden.cases()))
def test_results_equal_the_golden_file(name, tmp_path):
    got = golden.record(name, golden.cases()[name], tmp_path)
    want = EXPECTED[name]
    _close(got["metrics"], want["metrics"], 1e-6, f"{name} metrics")
    _close(got["states"], want["states"], 1e-4, f"{name} states")
