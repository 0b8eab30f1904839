"""The fuzz campaign (tap_testing.fuzz) at a small size: ``TAP_FUZZ_CASES`` cases per handler (30 unless set;
``bench/faults.py`` runs 1000 or more). Nothing may crash, answer INTERNAL or change the aggregate."""

from __future__ import annotations

from tap_testing.fuzz import HANDLERS, cases_from_env, run_campaign


def test_fuzzed_codec_and_handlers_never_crash_answer_internal_or_touch_the_aggregate():
    cases = cases_from_env(30)
    counts = run_campaign(cases, grpc_cases=max(3, cases // 10), seed=0)
    assert (counts.crashes, counts.internal_errors, counts.aggregate_corruptions) == (0, 0, 0), counts.failures
    for handler in HANDLERS:
        assert counts.per_handler[handler] >= cases, (handler, counts.per_handler)
        if handler != "codec":
            assert counts.per_handler[f"{handler} (gRPC)"] >= 3, counts.per_handler
    refusals = {answer for answer in counts.answers if answer.startswith(("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"))}
    assert {"INVALID_ARGUMENT malformed", "RESOURCE_EXHAUSTED oversize"} <= refusals, counts.answers
