"""What a scenario hands back: named figures and the checks that failed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Figure:
    name: str
    value: float
    unit: str = ""

    def shown(self) -> str:
        v = self.value
        text = f"{v:.0f}" if v.is_integer() or abs(v) >= 100 else f"{v:.3g}"
        return f"{text} {self.unit}".strip()


@dataclass
class ScenarioResult:
    scenario: str
    figures: list[Figure] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    def add(self, name: str, value: float, unit: str = "") -> None:
        self.figures.append(Figure(name, float(value), unit))

    def check(self, ok: bool, what: str) -> None:
        """Record ``what`` as a failure unless ``ok``: a scenario reports every broken check, not
        only the first."""
        if not ok:
            self.failures.append(what)

    def figure(self, name: str) -> float:
        for f in self.figures:
            if f.name == name:
                return f.value
        raise KeyError(f"{self.scenario} has no figure {name!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "passed": self.passed,
            "seconds": round(self.seconds, 2),
            "figures": {f.name: {"value": f.value, "unit": f.unit} for f in self.figures},
            "failures": self.failures,
        }
