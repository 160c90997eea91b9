"""The server's settings (`skeleton-ds serve` flags), apart from the HTTP stack: the command line takes its
defaults from here before fastapi is imported, so each default is written once."""

from __future__ import annotations

from dataclasses import dataclass

from skeleton_ds.errors import UserError

POLICIES = ("cross-task", "per-task", "off")
"""The batching policies (skeleton_ds.serving.server.Batcher)."""
MIX_RULES = ("cost", "count")
"""When cross-task batching mixes tasks, from --mix-min waiting (Batcher): while mixed passes cost less per example
than one-task passes, as measured while serving (cost), or always (count)."""


@dataclass(frozen=True)
class ServeSettings:
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_inputs: int = 256
    max_body_bytes: int = 1 << 20
    batching: str = "cross-task"  # a Batcher policy: cross-task | per-task | off
    max_queue: int = 4096  # examples waiting, all tasks; more: 503 (0: no bound)
    timeout_ms: float = 30_000  # a request not answered by then: 504
    stall_s: float = 60.0  # /healthz fails while one pass has run longer
    api_key: str | None = None  # every route but /healthz then needs "Authorization: Bearer <key>" (else 401)
    mix_min: int = 8  # cross-task: mix tasks in a pass only when at least this many examples wait; 0 mixes whatever
    # waits (docs/results/load_test_minilm64.json, 8 clients: 100.8 requests/s against 110.8 with 8)
    mix_by: str = "cost"  # from mix_min waiting: mix while it measures faster per row (cost), or always

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("--api-key (or SKELETON_DS_API_KEY) is empty: give a key, or leave it unset to serve "
                            "without one")
        for name in ("max_batch", "max_inputs", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("max_wait_ms", "max_queue", "mix_min"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be zero or positive, got {getattr(self, name)}")
        for name in ("timeout_ms", "stall_s"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.mix_by not in MIX_RULES:
            raise UserError(f"--mix-by takes {', '.join(MIX_RULES)}, got {self.mix_by!r}")
        if self.batching not in POLICIES:
            raise UserError(f"--batching takes {', '.join(POLICIES)}, got {self.batching!r}")
        if self.max_queue and self.max_queue < self.max_inputs:
            raise UserError(f"--max-queue {self.max_queue} is below --max-inputs {self.max_inputs}: a request the "
                            f"server accepts must fit in its queue")
