"""Prune while a stock ``transformers.Trainer`` trains: :class:`HomoDistilPruner` as a ``TrainerCallback``.

    callback = HomoDistilCallback(Widths(hidden=192, heads=6, head_dim=32, ffn=768))
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback]).train()
    small = callback.materialize()    # a dense stock model of the target shape

The schedule spans the Trainer's ``max_steps``. Importance is read in ``on_pre_optimizer_step`` (after
gradient accumulation and clipping) and pruned weights are zeroed again in ``on_optimizer_step``.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn
from transformers import TrainerCallback

from homoexport.errors import UsageError
from homoexport.pruning.mask_groups import Widths
from homoexport.pruning.pruner import HomoDistilPruner, PrunerSettings


class HomoDistilCallback(TrainerCallback):
    """Width-prunes the Trainer's model to ``target`` on HomoDistil's schedule.

    ``settings.total_steps`` is replaced by the Trainer's step count when training begins.
    """

    def __init__(self, target: Widths, settings: PrunerSettings | None = None):
        self.target = target
        self.settings = settings or PrunerSettings(total_steps=1)
        self.pruner: HomoDistilPruner | None = None

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if model is None:
            raise UsageError("HomoDistilCallback needs the Trainer's model at on_train_begin")
        if self.pruner is None:  # a resumed Trainer calls this again on the same callback
            self.pruner = HomoDistilPruner(model, self.target, replace(self.settings, total_steps=max(1, state.max_steps)))
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._pruner().after_backward(state.global_step)
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._pruner().after_optimizer_step()
        return control

    def _pruner(self) -> HomoDistilPruner:
        if self.pruner is None:
            raise RuntimeError("HomoDistilCallback: training has not begun")
        return self.pruner

    def materialize(self) -> nn.Module:
        """The dense model of the target shape (call after ``Trainer.train``)."""
        return self._pruner().materialize()
