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

    @classmethod
    def from_checks(
        cls,
        name: str,
        checks: dict[str, bool],
        numbers: dict[str, Any],
        summary: str | None = None,
        when_failed: str = "",
    ) -> "ScenarioOutcome":
        """Passed when every check held; the detail lists the checks (``summary`` instead, if given), or the
        failed ones followed by ``when_failed`` (a log tail, say)."""
        failed = [what for what, ok in checks.items() if not ok]
        held = summary if summary is not None else "; ".join(checks)
        if not failed:
            return cls(name, True, held, numbers)
        prefix = f"{summary}; " if summary is not None else ""
        return cls(name, False, f"{prefix}FAILED: {'; '.join(failed)}{when_failed}", numbers)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
