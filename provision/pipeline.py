"""The pipeline driver behind `provision run`: plan -> fetch -> verify -> convert -> smoke.

Each stage is a function taking the frozen ``Plan`` (or the previous result) and returning a
typed result; this module chains the stages that exist and records what each did. It never
prints: progress goes through the callback, failures are ``ProvisionError``s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.plan import Plan, make_plan
from provision.progress import ProgressFn
from provision.settings import Settings


@dataclass
class RunResult:
    plan: Plan
    dry_run: bool
    stages: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "dry_run": self.dry_run, "stages": self.stages}


def run_pipeline(
    source: str,
    *,
    settings: Settings | None = None,
    home: Path | None = None,
    offline: bool = False,
    dry_run: bool = False,
    progress: ProgressFn | None = None,
) -> RunResult:
    plan = make_plan(source, settings=settings, home=home, offline=offline)
    result = RunResult(plan=plan, dry_run=dry_run)
    result.stages.append({"stage": "plan", "result": "ok", "bytes_to_fetch": plan.bytes_to_fetch})
    return result
