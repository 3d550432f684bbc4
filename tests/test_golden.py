"""Same seed, same numbers: every golden fit (tests/golden.py) scores and ends with the weights on record."""

from __future__ import annotations

import json

import pytest
from golden import CASES, RECORD, differences, fit_all

RECORDED = json.loads(RECORD.read_text())


@pytest.mark.parametrize("name", list(CASES))
def test_a_golden_fit_keeps_its_metrics_and_weights(name):
    got = fit_all([name])
    assert not differences(got, {name: RECORDED[name]}), "\n".join(differences(got, {name: RECORDED[name]}))


def test_the_record_holds_every_case_and_the_comparison_sees_a_moved_metric():
    assert set(RECORDED) == set(CASES)
    moved = json.loads(json.dumps(RECORDED["mlp-csmf"]))
    moved["metrics"]["click"]["recall@50"] += 1e-12
    assert differences({"mlp-csmf": moved}, {"mlp-csmf": RECORDED["mlp-csmf"]}) == [
        f"mlp-csmf click: recall@50 {RECORDED['mlp-csmf']['metrics']['click']['recall@50']} -> "
        f"{moved['metrics']['click']['recall@50']}"
    ]
