"""Each attack of issue 9, run against a real mTLS server as a hostile silo would (tap_testing.attacks, small sizes):
the server must hold. ``bench/faults.py`` runs the same functions at the issue's sizes."""

from __future__ import annotations

import pytest

from tap_testing.attacks import ATTACKS, QUICK


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_held(name):
    outcome = ATTACKS[name](**QUICK.get(name, {}))
    assert outcome.passed, f"{outcome.detail}\n{outcome.numbers}"
    assert outcome.numbers  # the measured values behind the verdict
