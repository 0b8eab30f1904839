"""Download streams built once per round: each component's serialised frames, shared by every silo that holds it.

A round's global values do not change until the round closes, and every selected silo
downloads them, most of them the same components. :class:`DownloadFrames` keeps, per
component, the frames of its current values (``wire.component_frames``: the bytes gRPC
sends, CRCs included), built the first time a stream needs them and then handed to every
other stream as they are — no per-download encoding, copying or checksumming.

Bounded: one entry per component name, replaced when the values it was built from are no
longer the current ones (checked by identity, through weak references, so the cache never
keeps an old round's tensors alive): at most the global model once, at the wire dtype.

A frame names its component by its index in the stream's header, so an entry is built for
one index. Each stream's header lists its components in an order that puts as many of them
as possible at the index their frames were built for (the decoder accepts any order); a
component that cannot take its index in some stream gets frames built for that stream
alone (one copy of its bytes, as an uncached download would).

Frames are built lazily, one at a time, by whichever stream needs the next one first: the
first download of a round streams while it builds, and a slow reader never holds up the
others.
"""

from __future__ import annotations

import threading
import weakref
from typing import Iterable, Iterator

import torch

from tap_core.layout import Layout
from tap_core.model.tap_model import ComponentValues
from tap_core.wire import StreamInfo, TensorLayouts, component_frames, stream_header


class ComponentFrames:
    """One component's frames for one set of tensor values, at one stream index."""

    def __init__(
        self,
        index: int,
        component: str,
        tensors: dict[str, torch.Tensor],
        layout: TensorLayouts,
        dtype: str,
        chunk_bytes: int,
    ):
        self.index = index
        self.layout = tuple(layout)
        self._sources = tuple(weakref.ref(tensors[name]) for name, _ in layout)
        self._frames: list[bytes] = []
        self._builder: Iterator[bytes] | None = component_frames(index, component, tensors, layout, dtype, chunk_bytes)
        self._lock = threading.Lock()
        self.nbytes = 0

    def built_from(self, tensors: dict[str, torch.Tensor], layout: TensorLayouts) -> bool:
        """Whether these frames carry exactly ``tensors`` (the same objects) in ``layout``."""
        return tuple(layout) == self.layout and all(
            ref() is tensors.get(name) for ref, (name, _) in zip(self._sources, layout)
        )

    @property
    def alive(self) -> bool:
        return all(ref() is not None for ref in self._sources)

    def _frame(self, position: int) -> bytes | None:
        if position < len(self._frames):
            return self._frames[position]
        with self._lock:
            while position >= len(self._frames) and self._builder is not None:
                frame = next(self._builder, None)
                if frame is None:
                    self._builder = None  # built: drop the encoder and its references to the tensors
                else:
                    self._frames.append(frame)
                    self.nbytes += len(frame)
            return self._frames[position] if position < len(self._frames) else None

    def __iter__(self) -> Iterator[bytes]:
        position = 0
        while (frame := self._frame(position)) is not None:
            yield frame
            position += 1


class DownloadFrames:
    """The frames of the current global values, per component (see the module docstring)."""

    def __init__(self, dtype: str, chunk_bytes: int):
        self.dtype = dtype
        self.chunk_bytes = chunk_bytes
        self._entries: dict[str, ComponentFrames] = {}
        self._lock = threading.Lock()
        self.builds = 0  # entries built (a test and the bench read it: once per component per round)

    @property
    def nbytes(self) -> int:
        """Bytes of frames held now."""
        return sum(entry.nbytes for entry in list(self._entries.values()))

    def stream(self, values: ComponentValues, layout: Layout, info: StreamInfo) -> Iterator[bytes]:
        """Every frame of a download of ``values`` in ``layout``: the header, then each component's frames.

        The stream binds to its components' frames when it starts, so one still streaming an
        older round's values never evicts the current round's entries.
        """
        with self._lock:
            for name in [n for n, e in self._entries.items() if not e.alive]:
                del self._entries[name]  # an old round's: its tensors are gone
            order = self._order(layout)
            sources = [self._source(i, c, values[c], layout[c]) for i, c in enumerate(order)]
        yield stream_header(order, layout, self.dtype, info)
        for source in sources:
            yield from source

    def _order(self, layout: Layout) -> list[str]:
        """The stream's component order: each at the index its frames were built for, where that slot is free."""
        slots: list[str | None] = [None] * len(layout)
        rest = []
        for name in layout:
            entry = self._entries.get(name)
            if entry is not None and entry.index < len(slots) and slots[entry.index] is None:
                slots[entry.index] = name
            else:
                rest.append(name)
        free = iter([i for i, name in enumerate(slots) if name is None])
        for name in rest:
            slots[next(free)] = name
        return [name for name in slots if name is not None]

    def _source(
        self, index: int, component: str, tensors: dict[str, torch.Tensor], layout: TensorLayouts
    ) -> Iterable[bytes]:
        """The component's cached frames; built now if its values changed; this stream's own if its index differs."""
        entry = self._entries.get(component)
        if entry is None or not entry.built_from(tensors, layout):
            entry = self._entries[component] = ComponentFrames(
                index, component, tensors, layout, self.dtype, self.chunk_bytes
            )
            self.builds += 1
        if entry.index != index:
            return component_frames(index, component, tensors, layout, self.dtype, self.chunk_bytes)
        return entry
