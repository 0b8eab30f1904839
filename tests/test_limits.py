"""The server's defences in isolation: per-silo call limits, the call watch (idle, too long, revoked), server capacity,
the safe intake of bytes and JSON, capped aggregation weights and the update-norm bound."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
import torch

from tap_core.config import FederationConfig, LimitsConfig
from tap_core.errors import Rejected
from tap_core.proto.tap.v1 import federation_pb2 as pb
from tap_server.aggregation import capped_weights
from tap_server.intake import Undecodable, parse_json, safe_deserializer
from tap_server.limits import KINDS, CallLimiter, CallWatch, per_silo_limit, server_capacity
from tap_server.metrics import ServerMetrics
from tap_server.validation import check_update_norm


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Context:
    """A server context that records how it was cancelled (the public fallback of ``limits.cancel``)."""

    def __init__(self) -> None:
        self.cancelled = 0

    def cancel(self) -> None:
        self.cancelled += 1


def in_flight(metrics: ServerMetrics, kind: str) -> float:
    return metrics.registry.get_sample_value("tap_calls_in_flight", {"kind": kind})


def rejected(metrics: ServerMetrics, reason: str) -> float:
    return metrics.registry.get_sample_value("tap_rejected_requests_total", {"reason": reason}) or 0.0


# ---------------------------------------------------------------- per-silo limits


def test_a_silo_over_its_own_limit_is_refused_and_others_are_not():
    metrics = ServerMetrics()
    limits = LimitsConfig(polls_per_silo=2)
    limiter = CallLimiter(limits, metrics)
    first, second = limiter.call("flooder", "poll", Context(), b"f"), limiter.call("flooder", "poll", Context(), b"f")
    with first, second:
        assert in_flight(metrics, "poll") == 2
        with pytest.raises(Rejected, match="already has 2 poll call") as info:
            with limiter.call("flooder", "poll", Context(), b"f"):
                pass
        assert info.value.reason == "too_many_calls" and info.value.status == "RESOURCE_EXHAUSTED"
        assert "limits.polls_per_silo" in str(info.value)
        with limiter.call("honest", "poll", Context(), b"h"), limiter.call("flooder", "unary", Context(), b"f"):
            assert in_flight(metrics, "poll") == 3 and in_flight(metrics, "unary") == 1
    assert all(in_flight(metrics, kind) == 0 for kind in KINDS)
    with limiter.call("flooder", "poll", Context(), b"f"):  # released: it may poll again
        pass


def test_server_capacity_fits_every_silo_using_all_its_limits():
    config = FederationConfig()
    for silos in (1, 3, 64):
        capacity = server_capacity(config, silos, min_workers=64)
        assert capacity.workers >= silos * sum(per_silo_limit(config.limits, k) for k in KINDS) + 16
        assert capacity.max_concurrent_rpcs >= 4 * capacity.workers
    options = dict(server_capacity(config, 3, 64).options)
    assert options["grpc.max_concurrent_streams"] == config.limits.streams_per_connection
    assert options["grpc.max_receive_message_length"] > config.wire.max_message_bytes  # oversize reaches our check
    assert options["grpc.max_send_message_length"] == config.wire.max_message_bytes


# ------------------------------------------------------------------ the call watch


def watch_with(limits: LimitsConfig, identities: dict[bytes, str | Rejected]):
    clock, metrics = Clock(), ServerMetrics()
    limiter = CallLimiter(limits, metrics, clock=clock)

    def identify(certificate: bytes) -> str:
        verdict = identities[certificate]
        if isinstance(verdict, Rejected):
            raise verdict
        return verdict

    return clock, metrics, limiter, CallWatch(limiter, identify, clock=clock)


def test_the_watch_cuts_idle_and_overlong_streams_only():
    limits = LimitsConfig(stream_idle_s=5, stream_max_s=60)
    clock, metrics, limiter, watch = watch_with(limits, {b"a": "a", b"b": "b"})
    upload, download, poll = Context(), Context(), Context()
    with (
        limiter.call("a", "upload", upload, b"a") as up,
        limiter.call("b", "download", download, b"b") as down,
        limiter.call("a", "poll", poll, b"a"),
    ):
        with up.waiting(clock):
            clock.now += 4
            assert watch.sweep() == 3 and not upload.cancelled  # within the idle timeout
            clock.now += 2
            watch.sweep()
        assert upload.cancelled == 1 and up.ended == "stream_idle"
        assert rejected(metrics, "stream_idle") == 1
        clock.now += 100  # the poll is not a stream: no idle or duration limit; the download is over its maximum
        watch.sweep()
        assert down.ended == "stream_too_long" and download.cancelled == 1 and poll.cancelled == 0
        watch.sweep()  # each call is cut once
        assert rejected(metrics, "stream_too_long") == 1 and download.cancelled == 1


def test_the_watch_ends_every_call_of_a_revoked_silo():
    identities: dict[bytes, str | Rejected] = {b"rogue": "rogue", b"honest": "honest"}
    clock, metrics, limiter, watch = watch_with(LimitsConfig(), identities)
    rogue_poll, rogue_upload, honest_poll = Context(), Context(), Context()
    with (
        limiter.call("rogue", "poll", rogue_poll, b"rogue"),
        limiter.call("rogue", "upload", rogue_upload, b"rogue"),
        limiter.call("honest", "poll", honest_poll, b"honest"),
    ):
        watch.sweep()
        assert not rogue_poll.cancelled
        identities[b"rogue"] = Rejected("revoked", "the certificate of silo rogue was revoked")
        clock.now += 0.5  # identities are checked once a second
        watch.sweep()
        assert not rogue_poll.cancelled
        clock.now += 1
        watch.sweep()
        assert rogue_poll.cancelled == 1 and rogue_upload.cancelled == 1 and honest_poll.cancelled == 0
        assert rejected(metrics, "revoked") == 2


# ------------------------------------------------------------------------ intake


@pytest.mark.parametrize(
    "text, reason, words",
    [
        ('{"n": Infinity}', "malformed", "not a number JSON allows"),
        ('{"n": -Infinity}', "malformed", "not a number JSON allows"),
        ('{"n": NaN}', "malformed", "not a number JSON allows"),
        ('{"n": 1e400}', "malformed", "out of range"),
        ('{"n": -1e400}', "malformed", "out of range"),
        ('{"n": 1' + "0" * 400 + "}", "malformed", "out of range"),
        ("[" * 100_000 + "]" * 100_000, "malformed", "nested too deeply"),
        ('{"a": ' * 100_000 + "1" + "}" * 100_000, "malformed", "nested too deeply"),
        ("[1, 2]", "malformed", "not a JSON object"),
        ("{", "malformed", "not valid JSON"),
        ('{"pad": "' + "x" * 2000 + '"}', "oversize", "at most 1024"),
    ],
)
def test_json_that_python_would_take_or_choke_on_is_refused(text, reason, words):
    with pytest.raises(Rejected, match=words) as info:
        parse_json(text, "declaration_json", 1024 if reason == "oversize" else 10_000_000)
    assert info.value.reason == reason and info.value.status in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")


def test_json_within_bounds_is_parsed_as_json():
    assert parse_json('{"a": [1, 2.5, -9223372036854775807, 1e308, "x"], "b": null}', "x", 1000) == {
        "a": [1, 2.5, -9223372036854775807, 1e308, "x"],
        "b": None,
    }


def test_bytes_that_are_no_message_or_too_large_arrive_as_a_refusal():
    deserialize = safe_deserializer(pb.JoinRequest.FromString, 64)
    assert deserialize(pb.JoinRequest(declaration_json="{}").SerializeToString()).declaration_json == "{}"
    garbage = deserialize(b"\xff\xff\xff\xff\x0f")
    assert isinstance(garbage, Undecodable) and garbage.rejected().reason == "malformed"
    too_big = deserialize(pb.JoinRequest(declaration_json="x" * 100).SerializeToString())
    assert isinstance(too_big, Undecodable) and too_big.rejected().reason == "oversize"
    assert "wire.max_message_bytes" in str(too_big.rejected())


def test_frames_received_as_bytes_are_still_bounded():
    """Upload has no deserialiser (its frames reach StreamDecoder unparsed): the size bound still holds."""
    deserialize = safe_deserializer(None, 64)
    assert deserialize(b"\xff\xff\xff\xff\x0f") == b"\xff\xff\xff\xff\x0f"  # parsed (and refused) by the decoder
    too_big = deserialize(b"x" * 65)
    assert isinstance(too_big, Undecodable) and too_big.rejected().reason == "oversize"


# ------------------------------------------------------------ robust aggregation


@pytest.mark.parametrize(
    "declared, share, expected",
    [
        ({"a": 1e9, "b": 10.0}, 0.5, {"a": 10.0, "b": 10.0}),  # the 1e9-sample silo: half of the total, not all of it
        ({"a": 10.0, "b": 6.0}, 0.5, {"a": 6.0, "b": 6.0}),
        ({"a": 100.0, "b": 1.0, "c": 1.0}, 0.5, {"a": 2.0, "b": 1.0, "c": 1.0}),
        ({"a": 100.0, "b": 50.0, "c": 10.0, "d": 10.0}, 0.4, {"a": 40.0, "b": 40.0, "c": 10.0, "d": 10.0}),
        ({"a": 5.0, "b": 4.0, "c": 3.0}, 0.5, {"a": 5.0, "b": 4.0, "c": 3.0}),  # nobody above half: unchanged
        ({"a": 9.0, "b": 1.0}, 0.3, {"a": 1.0, "b": 1.0}),  # 0.3 < 1/2 is impossible: equal weights
        ({"a": 9.0, "b": 1.0}, None, {"a": 9.0, "b": 1.0}),
        ({"a": 9.0}, 0.5, {"a": 9.0}),  # a component only one silo holds is that silo's
    ],
)
def test_capped_weights(declared, share, expected):
    weights, capped = capped_weights({silo: {"head.x": w} for silo, w in declared.items()}, share)
    assert {silo: w["head.x"] for silo, w in weights.items()} == pytest.approx(expected)
    assert sorted(capped) == sorted(s for s in declared if declared[s] > expected[s] + 1e-9)
    total = sum(expected.values())
    if share is not None and len(declared) * share >= 1:
        assert max(w["head.x"] for w in weights.values()) <= share * total + 1e-9


def test_capped_weights_are_per_component():
    weights, capped = capped_weights({"big": {"shared": 90.0, "own": 90.0}, "small": {"shared": 10.0}}, 0.5)
    assert weights == {"big": {"shared": 10.0, "own": 90.0}, "small": {"shared": 10.0}}
    assert capped == {"big": ["shared"]}


def test_update_norm_bound():
    current = {"c": {"w": torch.ones(100), "z": torch.zeros(100)}}
    honest = {"c": {"w": torch.ones(100) * 1.5, "z": torch.full((100,), 0.1)}}
    check_update_norm(honest, current, 10.0)
    for poison in (1e30, float("nan"), float("inf"), 20.0):
        values = {"c": {"w": torch.full((100,), poison), "z": torch.zeros(100)}}
        with pytest.raises(Rejected, match="aggregation.max_update_norm_ratio") as info:
            check_update_norm(values, current, 10.0)
        assert info.value.reason == "update_norm" and info.value.status == "INVALID_ARGUMENT"
    check_update_norm({"c": {"w": torch.full((100,), 1e30), "z": torch.zeros(100)}}, current, None)  # no bound
    # a component whose global values are all zero may still move (the floor of 0.01 per element)
    zero = {"c": {"w": torch.zeros(100)}}
    check_update_norm({"c": {"w": torch.full((100,), 0.05)}}, zero, 10.0)
    with pytest.raises(Rejected):
        check_update_norm({"c": {"w": torch.full((100,), 0.2)}}, zero, 10.0)
    # the cache of global norms is filled once and then used: a cached norm decides the bound
    cache: dict[str, float] = {}
    check_update_norm(honest, current, 10.0, cache)
    assert cache == {"c": pytest.approx(100.0)}
    cache["c"] = 1e-12  # as if the global values were (near) zero: the same honest update is now too large
    with pytest.raises(Rejected):
        check_update_norm(honest, current, 10.0, cache)


def test_limits_and_aggregation_config_is_validated():
    from tap_core.config import AggregationConfig, ConfigError, validate_federation

    base = FederationConfig()
    validate_federation(base)
    for change, words in (
        (dict(limits=LimitsConfig(polls_per_silo=0)), "polls_per_silo"),
        (dict(limits=LimitsConfig(stream_idle_s=10, stream_max_s=5)), "stream_max_s"),
        (dict(limits=LimitsConfig(max_plan_bytes=100)), "max_plan_bytes"),
        (dict(limits=LimitsConfig(streams_per_connection=2)), "streams_per_connection"),
        (dict(aggregation=AggregationConfig(max_weight_share=0.0)), "max_weight_share"),
        (dict(aggregation=AggregationConfig(max_weight_share=1.5)), "max_weight_share"),
        (dict(aggregation=AggregationConfig(max_update_norm_ratio=-1.0)), "max_update_norm_ratio"),
    ):
        with pytest.raises(ConfigError, match=words):
            validate_federation(dataclasses.replace(base, **change))
    validate_federation(
        dataclasses.replace(base, aggregation=AggregationConfig(max_weight_share=0.5, max_update_norm_ratio=None))
    )


def test_cancel_falls_back_to_the_public_cancel():
    from tap_server.limits import cancel

    context = Context()
    cancel(context, grpc.StatusCode.DEADLINE_EXCEEDED, "idle")
    assert context.cancelled == 1
