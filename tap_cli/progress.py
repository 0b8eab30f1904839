"""Progress display for long runs: a tqdm bar with round, phase, loss and ETA."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


class FederationProgress:
    """Counts work units (one silo-round, one silo's stage 2) of a federation run."""

    def __init__(self, rounds: int, per_round: int, silos: int, label: str = "federation"):
        self.bar = tqdm(
            total=rounds * per_round + silos,
            desc=label,
            unit="update",
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5,
        )
        self.rounds = rounds

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event == "update":
            losses = info.get("losses") or {}
            mean = sum(losses.values()) / len(losses) if losses else float("nan")
            self.bar.set_postfix_str(f"round {info['round']}/{self.rounds} train {info['silo']} loss {mean:.3f}")
            self.bar.update(1)
        elif event == "result":
            self.bar.set_postfix_str(f"stage 2 {info['silo']}")
            self.bar.update(1)
        elif event == "data":
            self.bar.set_postfix_str(f"data loaded in {info['seconds']:.1f}s")

    def close(self) -> None:
        self.bar.close()
