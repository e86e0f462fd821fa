"""Every method's metrics and final states on the smoke recipe equal the golden file recorded by an earlier
version of the code (tests/golden.py): refactorings of the method seam and the engines change no arithmetic."""

import json

import pytest

from tests import golden

EXPECTED = json.loads(golden.GOLDEN.read_text())


def test_the_golden_file_covers_every_method_and_variant():
    from pfl.algorithms import ALGORITHMS

    assert set(EXPECTED) == set(golden.cases())
    assert set(golden.METHODS) == set(ALGORITHMS)


@pytest.mark.parametrize("name", sorted(golden.cases()))
def test_results_equal_the_golden_file(name, tmp_path):
    got = golden.record(name, golden.cases()[name], tmp_path)
    want = EXPECTED[name]
    assert got["metrics"] == want["metrics"]
    assert got["states"] == want["states"]
