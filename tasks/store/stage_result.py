"""What every stage hands back to the flow for the manifest: artifact records, timings, counts, notes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StageResult:
    artifacts: dict[str, dict]
    timings: dict[str, float]
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
