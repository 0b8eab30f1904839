"""What one fault, attack or load scenario reports (a row of ``bench/faults.py``'s JSON)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ScenarioOutcome:
    """``passed``: the system held (the honest silos finished / the refusal was right / nothing leaked)."""

    name: str
    passed: bool
    detail: str
    numbers: dict[str, Any] = field(default_factory=dict)  # measured values behind the verdict (seconds, MB, counts)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
