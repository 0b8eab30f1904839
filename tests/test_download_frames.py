"""Download frames built once per round and component, shared by every silo's stream, memory bounded."""

from __future__ import annotations

import gc
import threading
import weakref

import torch

from tap_core.layout import layout_bytes, select
from tap_core.proto.tap.v1 import federation_pb2 as pb
from tap_core.wire import StreamDecoder, StreamInfo
from tap_server.download_frames import DownloadFrames

LAYOUT = {
    "a": [("w", (64, 32)), ("b", (32,))],
    "b": [("w", (100, 20))],
    "c": [("w", (16, 16)), ("s", ())],
    "d": [("w", (50,))],
}
CHUNK = 1024


def global_values(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return {c: {n: torch.randn(shape, generator=gen) for n, shape in tensors} for c, tensors in LAYOUT.items()}


def download(frames: DownloadFrames, values, layout, round_index: int = 1) -> tuple[list[bytes], dict]:
    stream = list(frames.stream(values, layout, StreamInfo(round_index)))
    decoder = StreamDecoder(layout, "fp32")
    for message in stream:
        decoder.feed(message)
    return stream, decoder.finish()


def assert_carries(decoded, values, layout) -> None:
    assert set(decoded) == set(layout)
    for component, tensors in layout.items():
        for name, _ in tensors:
            assert torch.equal(decoded[component][name], values[component][name])


def test_every_silo_gets_the_same_frames_built_once():
    frames = DownloadFrames("fp32", CHUNK)
    values = global_values(0)
    first, decoded = download(frames, values, LAYOUT)
    assert_carries(decoded, values, LAYOUT)
    assert frames.builds == len(LAYOUT)
    for _ in range(3):
        again, decoded = download(frames, values, LAYOUT)
        assert_carries(decoded, values, LAYOUT)
        assert all(a is b for a, b in zip(first[1:], again[1:]))  # the very same bytes objects: no re-encoding
    assert frames.builds == len(LAYOUT)
    assert frames.nbytes == sum(len(m) for m in first[1:])


def test_silos_holding_different_components_share_what_they_hold():
    frames = DownloadFrames("fp32", CHUNK)
    values = global_values(1)
    orders = []
    for names in (["a", "b", "c"], ["b", "d"], ["a", "d"], ["c"], ["a", "b", "c", "d"]):
        layout = select(LAYOUT, names)
        stream, decoded = download(frames, values, layout)
        assert_carries(decoded, values, layout)
        orders.append(list(pb.TensorFrame.FromString(stream[0]).header.components))
    # a stream lists its components so that each sits at the index its frames were built for (the decoder
    # takes any order): b stays second, d is built first; where two want one index (a, d) or a stream is
    # too short (c alone), that stream gets its own frames; every component was built once
    assert orders == [["a", "b", "c"], ["d", "b"], ["a", "d"], ["c"], ["a", "b", "c", "d"]]
    assert frames.builds == len(LAYOUT)


def test_a_new_round_rebuilds_and_memory_stays_one_model():
    frames = DownloadFrames("fp32", CHUNK)
    one_model = layout_bytes(LAYOUT, "fp32")
    for round_index in range(1, 5):
        values = global_values(round_index)
        _, decoded = download(frames, values, LAYOUT, round_index)
        assert_carries(decoded, values, LAYOUT)
        assert frames.builds == len(LAYOUT) * round_index
        assert one_model < frames.nbytes < 1.05 * one_model + 1024


def test_the_cache_never_keeps_old_values_alive():
    frames = DownloadFrames("fp32", CHUNK)
    values = global_values(2)
    download(frames, values, LAYOUT)
    ref = weakref.ref(values["a"]["w"])
    del values
    gc.collect()
    assert ref() is None
    fresh = global_values(3)
    _, decoded = download(frames, fresh, LAYOUT)
    assert_carries(decoded, fresh, LAYOUT)  # dead entries were dropped and rebuilt


def test_concurrent_downloads_build_each_frame_once():
    frames = DownloadFrames("fp32", 64)  # many small frames: the streams overtake each other while building
    values = global_values(4)
    results: list = [None] * 8

    def run(i: int) -> None:
        results[i] = download(frames, values, LAYOUT)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(results))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert frames.builds == len(LAYOUT)
    first = results[0][0]
    for stream, decoded in results:
        assert_carries(decoded, values, LAYOUT)
        assert all(a is b for a, b in zip(first[1:], stream[1:]))
