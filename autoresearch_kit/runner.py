"""run_budgeted(): train one candidate train.py under a fixed budget, safely (parent side).

(Being written: the RunResult contract below is fixed; the supervisor lands next.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

STATUSES = ("ok", "crash", "timeout", "diverged", "invalid", "aborted")


@dataclass
class RunResult:
    """What one budgeted run produced. Only `ok` runs carry a val_bpb."""

    status: str                              # one of STATUSES
    val_bpb: float | None = None
    reason: str = ""                         # readable cause for any non-ok status
    steps: int = 0
    tokens: int = 0                          # training tokens, counted by the harness loader
    flops: float = 0.0                       # training FLOPs, counted by the harness
    peak_memory_gb: float | None = None
    mfu: float | None = None                 # model FLOPs utilisation, where peak FLOPs are known
    params: int | None = None
    training_seconds: float = 0.0            # budgeted training time (warm-up excluded)
    total_seconds: float = 0.0               # child's own start -> result, as it reported
    wall_seconds: float = 0.0                # parent: spawn -> exit, measured by the runner
    eval_seconds: float = 0.0
    eval_tokens: int = 0
    budget: str = ""                         # str(Budget)
    seed: int | None = None
    device: str = ""                         # e.g. "cuda: NVIDIA H100 80GB HBM3"
    torch_version: str = ""
    log_path: str = ""
    log_tail: str = ""                       # last lines of output, for crashes
    curve: list[dict[str, Any]] = field(default_factory=list)  # metric events (step, loss, ...)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunResult":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})
