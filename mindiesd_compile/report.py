"""What the passes found, rewrote and left alone: one table per compile, merged across graphs."""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List

log = logging.getLogger("mindiesd_compile")


@dataclasses.dataclass
class PatternStats:
    found: int = 0
    rewritten: int = 0
    skipped: List[Dict[str, str]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return {"found": self.found, "rewritten": self.rewritten, "skipped": [dict(s) for s in self.skipped]}


class Report:
    """Per pattern: sites found, sites rewritten, near-misses left alone (where, why).

    ``to_dict()`` is the stable, user-facing form. Failed passes are listed under ``errors``.
    """

    def __init__(self, patterns=()):
        self.patterns: Dict[str, PatternStats] = {name: PatternStats() for name in patterns}
        self.errors: List[Dict[str, str]] = []
        self.timings: Dict[str, float] = {}  # seconds spent per pass
        self.cache_hits = 0  # graphs Inductor served from its FX graph cache: the passes did not run again

    def stats(self, pattern: str) -> PatternStats:
        return self.patterns.setdefault(pattern, PatternStats())

    def found(self, pattern: str) -> None:
        self.stats(pattern).found += 1

    def rewritten(self, pattern: str) -> None:
        self.stats(pattern).rewritten += 1

    def skipped(self, pattern: str, where: str, why: str) -> None:
        self.stats(pattern).skipped.append({"where": where, "why": why})

    def failed(self, pass_name: str, error: BaseException) -> None:
        self.errors.append({"pass": pass_name, "error": f"{type(error).__name__}: {error}"})

    def merge(self, other: "Report") -> None:
        for name, s in other.patterns.items():
            mine = self.stats(name)
            mine.found += s.found
            mine.rewritten += s.rewritten
            mine.skipped.extend(s.skipped)
        self.errors.extend(other.errors)
        for name, t in other.timings.items():
            self.timings[name] = self.timings.get(name, 0.0) + t
        self.cache_hits += other.cache_hits

    def to_dict(self) -> dict:
        return {name: s.to_dict() for name, s in self.patterns.items()}

    def table(self) -> str:
        lines = [f"{'pattern':<16}{'found':>7}{'rewritten':>11}  skipped (why)"]
        for name, s in self.patterns.items():
            whys = sorted({k["why"] for k in s.skipped})
            lines.append(f"{name:<16}{s.found:>7}{s.rewritten:>11}  {len(s.skipped)}"
                         + (f" ({'; '.join(whys)})" if whys else ""))
        for e in self.errors:
            lines.append(f"pass {e['pass']} FAILED and was rolled back: {e['error']}")
        if self.cache_hits:
            lines.append(f"{self.cache_hits} graph(s) came from Inductor's FX graph cache, compiled with these passes "
                         "earlier; their sites are not counted here (mindiesd_compile.report() counts them)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Report(\n{self.table()}\n)"
