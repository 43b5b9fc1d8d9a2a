"""The pruning schedule: how wide the student is at every step (HomoDistil, Liang et al., ICLR 2023, §3).

The remaining share of the *removable* width follows a cubic curve from 1 at ``t_i`` to 0 at
``total - t_f``: fast pruning while the student is still close to the teacher, gentle near the target,
then ``t_f`` steps of distillation at the final width. Masks change only every ``interval`` steps.
Intermediate kept counts are rounded up to a hardware-friendly multiple; the final widths are the
targets exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from homoexport.errors import UsageError
from homoexport.pruning.mask_groups import Widths


@dataclass(frozen=True)
class Schedule:
    """Cubic width schedule between ``full`` and ``target`` widths."""

    full: Widths
    target: Widths
    total_steps: int
    t_i: int = 0  # steps at full width before pruning starts
    t_f: int = 0  # steps at the final width after pruning ends
    interval: int = 1  # prune every this many steps (ΔT)
    multiple: int = 8  # round intermediate counts up to this multiple where the target allows

    def __post_init__(self) -> None:
        for field in ("hidden", "heads", "head_dim", "ffn"):
            t, f = getattr(self.target, field), getattr(self.full, field)
            if not 0 < t <= f:
                raise UsageError(f"target {field}={t} must be in [1, {f}] (the teacher's {field})")
        if self.t_i < 0 or self.t_f < 0 or self.interval < 1:
            raise UsageError("t_i and t_f must be >= 0 and interval >= 1")
        if self.t_i + self.t_f > self.total_steps:
            raise UsageError(f"t_i ({self.t_i}) + t_f ({self.t_f}) exceeds total_steps ({self.total_steps})")

    @property
    def end(self) -> int:
        """The step from which the student is at the target width (at the latest the last step, so the
        final widths always equal the targets)."""
        return max(self.t_i, self.total_steps - max(self.t_f, 1))

    def remaining(self, step: int) -> float:
        """Share of the removable width still present at ``step``: 1 before t_i, 0 from ``end`` on."""
        if step < self.t_i:
            return 1.0
        if step >= self.end:
            return 0.0
        progress = (step - self.t_i) / (self.end - self.t_i)
        return (1.0 - progress) ** 3

    def is_update_step(self, step: int) -> bool:
        """Masks change at t_i, every ``interval`` steps after it, and always at ``end``."""
        if step == self.end:
            return True
        return self.t_i <= step < self.end and (step - self.t_i) % self.interval == 0

    def widths_at(self, step: int) -> Widths:
        """Kept widths the masks must have after the update at ``step`` (monotone non-increasing)."""
        r = self.remaining(step)
        if r == 0.0:
            return self.target

        def count(full: int, target: int, multiple: int) -> int:
            exact = target + (full - target) * r
            rounded = math.ceil(exact / multiple) * multiple if multiple > 1 else math.ceil(exact)
            return max(target, min(full, rounded))

        return Widths(
            hidden=count(self.full.hidden, self.target.hidden, self.multiple),
            heads=count(self.full.heads, self.target.heads, 1),
            head_dim=count(self.full.head_dim, self.target.head_dim, min(self.multiple, 8)),
            ffn=count(self.full.ffn, self.target.ffn, self.multiple),
        )


def one_shot(full: Widths, target: Widths, total_steps: int) -> Schedule:
    """Prune to the target at step 0, then distill (the one-shot baseline of KD-revisited studies)."""
    return Schedule(full=full, target=target, total_steps=total_steps, t_i=0, t_f=total_steps, interval=1)
