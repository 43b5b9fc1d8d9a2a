"""HomoDistil's pruning as an object any training loop can drive.

The user owns the loop, in the manner of Torch-Pruning's ``MetaPruner.step()``::

    pruner = HomoDistilPruner(student, target, PrunerSettings(total_steps=1000))
    for step in range(1000):
        loss(student(batch)).backward()
        pruner.after_backward(step)        # importance from the final gradients; masks on schedule steps
        optimizer.step(); optimizer.zero_grad()
        pruner.after_optimizer_step()      # pruned weights back to exactly 0
    dense = pruner.materialize()           # a stock, smaller model computing the same function

A loop that wants its steps to cost what the kept widths cost materialises on the way down and trains on the
smaller model, ``pruner.rebase(dense)`` after it has cut its optimizer state (:func:`slice_optimizer_state`); masks only
ever shrink, so the dense model computes what the masked one did and pruning goes on over it.

Importance is the PLATON-smoothed sensitivity summed over each unit's mask group and the width follows
the cubic schedule of Liang et al. (HomoDistil, ICLR 2023); masks are monotone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from homoexport.errors import ParityError, UsageError
from homoexport.pruning.importance import METHODS, ImportanceTracker
from homoexport.pruning.mask_groups import (
    KeptHeads,
    MaskedModel,
    Masks,
    Widths,
    build_layout,
    full_widths,
    prepare,
    shrink,
)
from homoexport.pruning.schedule import Schedule, one_shot
from homoexport.pruning.surgery import materialize, parity_max_abs_diff

ScheduleKind = Literal["homotopic", "one_shot"]
PARITY_TOLERANCE = 1e-4  # max |masked - materialised| over every output: the invariant of the masked student


@dataclass(frozen=True)
class PrunerSettings:
    """How fast and by which scores the student shrinks; validated on creation, recorded in reports."""

    total_steps: int
    schedule: ScheduleKind = "homotopic"
    importance: str = "platon"
    beta1: float = 0.85
    beta2: float = 0.95
    t_i: int = 0  # steps at full width before pruning starts
    t_f: int = 0  # steps at the final width after pruning ends
    interval: int = 10  # masks change every this many steps
    multiple: int = 8  # intermediate widths rounded up to this multiple

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise UsageError(f"total_steps must be at least 1, got {self.total_steps}")
        if self.schedule not in ("homotopic", "one_shot"):
            raise UsageError(f"schedule {self.schedule!r} is not one of homotopic, one_shot")
        if self.importance not in METHODS:
            raise UsageError(f"importance {self.importance!r} is not one of {', '.join(METHODS)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise UsageError(f"beta1 and beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")


class HomoDistilPruner:
    """Importance tracker + width schedule + monotone masks over one model, materialised at the end.

    ``model`` is prepared in place (hidden LayerNorms become masked ones); it computes what it did
    before until a unit is pruned. ``verify`` (optional) sees every new set of masks before it is
    installed: data-parallel trainers use it to check that every rank chose the same units.
    """

    def __init__(self, model: nn.Module, target: Widths, settings: PrunerSettings,
                 verify: Callable[[Masks], None] | None = None):
        self.settings = settings
        self.masked: MaskedModel = prepare(model)
        self.full = full_widths(self.masked.layout)
        s = settings
        if s.schedule == "one_shot":
            self.schedule = one_shot(self.full, target, s.total_steps)
        else:
            self.schedule = Schedule(self.full, target, s.total_steps, t_i=s.t_i, t_f=s.t_f, interval=s.interval, multiple=s.multiple)
        self.importance = ImportanceTracker(model, self.masked.layout, s.importance, s.beta1, s.beta2)  # type: ignore[arg-type]
        self.verify = verify
        self.scoring = True  # False once stop_scoring() dropped the scores
        self.stages: list[Masks] = []  # the masks of every rebase(), each over the model before it: resume replays them
        layers, heads = self.masks.heads.shape
        self._head_origin = torch.arange(heads).repeat(layers, 1)  # [layers, heads of the model now] -> the first model's head

    def stop_scoring(self) -> None:
        """Drop the importance scores and the full-width model once the loop trains the materialised student and
        nothing is pruned any more: the scores are two float32 copies of the model (PLATON's mean and uncertainty), in
        memory and in every checkpoint. The masks stay: widths, kept heads, slicing and the pruner's state."""
        self.importance.mean, self.importance.uncertainty, self.importance.params = {}, {}, {}
        self.masked.release()
        self.scoring = False

    @property
    def model(self) -> nn.Module:
        return self.masked.module()

    @property
    def target(self) -> Widths:
        return self.schedule.target

    @property
    def masks(self) -> Masks:
        return self.masked.masks

    def widths(self) -> Widths:
        return self.masked.widths()

    def kept_heads(self) -> KeptHeads:
        """The heads still in the student, numbered as in the model the pruner started from (the teacher's copy) and as in
        the model it is over now: the attention term compares one with the other."""
        own = self.masks.heads
        first = torch.zeros(own.shape[0], self.full.heads, dtype=torch.bool).scatter_(1, self._head_origin, own)
        return KeptHeads(teacher=first, student=own)

    def worth_rebasing(self, share: float) -> bool:
        """True when the kept widths cost at most ``share`` of the model the masks are over, counted as the weights of an
        encoder layer (the matrix-multiply work per token): the point to continue on the materialised model."""
        return layer_weights(self.widths()) <= share * layer_weights(full_widths(self.masked.layout))

    def rebase(self, dense: nn.Module, final: bool = False) -> None:
        """Go on over ``dense``, the materialisation of the masked model (:meth:`materialize`), which the loop trains from
        now on: its masks start full, the importance scores are cut to the kept units
        (:meth:`~homoexport.pruning.importance.ImportanceTracker.rebased`) and the schedule goes on where it was, so units
        are chosen as they would have been over the masked model. ``final``: the target is reached for good, so
        nothing is prepared and the scores are dropped (:meth:`stop_scoring`); ``dense`` stays a stock model.

        The loop cuts its own optimizer state and loss projections before this call, while :attr:`masks` still describe
        the model they were made for.
        """
        if not self.scoring:
            raise RuntimeError("rebase() after stop_scoring(): the pruner is over its final model already")
        old = self.masks
        self.stages.append(old.clone())
        self._head_origin = torch.stack([self._head_origin[layer][old.heads[layer]] for layer in range(old.heads.shape[0])])
        if final:
            layout = build_layout(dense)
            self.masked = MaskedModel(None, layout, Masks.full(layout))
            self.stop_scoring()
            return
        self.masked = prepare(dense)
        self.importance = self.importance.rebased(dense, self.masked.layout, old)

    def reached_target(self, step: int) -> bool:
        """True once the masks after ``step`` are the target and can never change again."""
        return step >= self.schedule.end and self.widths() == self.target

    def after_backward(self, step: int) -> bool:
        """Fold this step's gradients into the scores and, on a schedule step, shrink the masks.

        Call after the gradients are final (accumulated, all-reduced), before the optimizer step.
        Returns True when the masks changed.
        """
        if step > self.schedule.end:
            return False
        if not self.scoring:
            raise RuntimeError("after_backward() after stop_scoring(): the scores are gone")
        self.importance.update()
        if not self.schedule.is_update_step(step):
            return False
        widths = self.schedule.widths_at(step)
        if widths == self.widths():
            return False
        self._install(shrink(self.masks, self.importance.unit_scores(), widths))
        return True

    def prune_to_target(self) -> None:
        """Shrink straight to the target from the scores seen so far (one-shot pruning)."""
        if not self.scoring:
            raise RuntimeError("prune_to_target() after stop_scoring(): the scores are gone")
        self._install(shrink(self.masks, self.importance.unit_scores(), self.target))

    def _install(self, masks: Masks) -> None:
        if self.verify is not None:
            self.verify(masks)
        self.masked.set_masks(masks)

    def after_optimizer_step(self) -> None:
        """Zero every pruned slice again: the optimizer moved it."""
        self.masked.apply()

    def materialize(self) -> nn.Module:
        """The dense, smaller model that computes what the masked one does (eval mode)."""
        return materialize(self.masked)

    def materialize_checked(self, probe: dict[str, torch.Tensor]) -> tuple[nn.Module, float]:
        """:meth:`materialize`, and the max |masked - dense| on ``probe`` (model inputs); a ParityError above
        PARITY_TOLERANCE, since a dense student that computes something else must never be trained on or saved."""
        dense = self.materialize()
        parity = parity_max_abs_diff(self.masked, dense, probe)
        if parity > PARITY_TOLERANCE:
            raise ParityError(f"masked and materialised students differ by {parity:.2e} > {PARITY_TOLERANCE}")
        return dense, parity

    def state_dict(self) -> dict:
        return {"stages": [m.state_dict() for m in self.stages], "masks": self.masks.state_dict(), "importance": self.importance.state_dict()}

    def load_state_dict(self, state: dict, dense: bool = False) -> None:
        """Masks and scores of a :meth:`state_dict` (``dense``: saved after the switch to the final model). Its
        :func:`stages` must have been replayed first (each installed with ``masked.set_masks``, materialised and passed to
        :meth:`rebase`), since only the loop can swap its model."""
        if len(self.stages) != len(stages(state, dense)):
            raise ValueError(f"the state has {len(stages(state, dense))} rebased stages and this pruner {len(self.stages)}: replay them first")
        if not self.scoring:  # over the final model: its masks are full and its scores dropped
            return
        self.masked.set_masks(Masks.from_state_dict(state["masks"]))
        self.importance.load_state_dict(state["importance"])


def stages(state: dict, dense: bool = False) -> list[Masks]:
    """The masks a pruner's :meth:`~HomoDistilPruner.state_dict` was rebased through, in order. A state written before
    stages had none; ``dense``: it was saved after the loop switched to the materialised target, whose masks it holds."""
    if "stages" in state:
        return [Masks.from_state_dict(m) for m in state["stages"]]
    return [Masks.from_state_dict(state["masks"])] if dense else []


def layer_weights(widths: Widths) -> int:
    """Weights of one encoder layer at ``widths``: Q, K, V and the attention output, then the FFN's two matrices."""
    return 4 * widths.hidden * widths.attn + 2 * widths.hidden * widths.ffn


def slice_optimizer_state(pruner: HomoDistilPruner, name: str, state: dict) -> dict:
    """One parameter's optimizer state (Adam moments, step) cut to the kept units, for training on after
    :meth:`HomoDistilPruner.materialize`.

    Where head_dim shrank, W_q' = c·W_q (c = sqrt(d/d0)), so gradients w.r.t. W_q' are those w.r.t.
    W_q divided by c: first moments scale by 1/c and second moments by 1/c².
    """
    from homoexport.pruning.surgery import query_scale, slice_tensor

    layout, masks = pruner.masked.layout, pruner.masks
    c = query_scale(layout, masks) if ".attention.self.query." in name else 1.0
    out = {}
    for key, value in state.items():
        if not torch.is_tensor(value) or value.dim() == 0:
            out[key] = value
            continue
        value = slice_tensor(name, value, layout, masks).clone().contiguous()
        if c != 1.0:
            value = value / c ** (2 if key == "exp_avg_sq" else 1)
        out[key] = value
    return out
