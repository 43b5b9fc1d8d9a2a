"""Importance scores of prunable units (HomoDistil, Liang et al., ICLR 2023, §3).

Per parameter, the sensitivity ``|θ · ∂L/∂θ|`` (first-order estimate of the loss change if θ were
zeroed). Three estimators:

- ``sensitivity``: the running mean of sensitivity over every update since the start (one-shot pruning
  scored on a few batches);
- ``ema``: an exponential moving average with β1;
- ``platon``: PLATON's upper-confidence score, EMA of sensitivity (β1) times EMA of its uncertainty
  ``|s - ema|`` (β2), which favours units whose importance is both high and stable.

A unit's score is the sum over every parameter slice it owns (rows, columns and biases in every tensor
of its mask group), so a hidden dim collects evidence from the embeddings, every layer and the heads.
Gradients must be the final (all-reduced, accumulated) ones so that every data-parallel rank computes
the same scores and prunes the same units.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from homoexport.errors import UsageError
from homoexport.pruning.mask_groups import ATTN, FFN, HIDDEN, Layout, UnitScores

Method = Literal["sensitivity", "ema", "platon"]
METHODS: tuple[str, ...] = ("sensitivity", "ema", "platon")


class ImportanceTracker:
    """Accumulates per-parameter importance from gradients and aggregates it per unit."""

    def __init__(self, model: nn.Module, layout: Layout, method: Method = "platon", beta1: float = 0.85, beta2: float = 0.95):
        if method not in METHODS:
            raise UsageError(f"importance method {method!r} is not one of {', '.join(METHODS)}")
        self.layout, self.method = layout, method
        self.beta1, self.beta2 = beta1, beta2
        self.params = {n: p for n, p in model.named_parameters() if n in layout.slices and layout.slices[n]}
        self.steps = 0
        self.mean: dict[str, torch.Tensor] = {}  # EMA (or running mean) of sensitivity, per parameter
        self.uncertainty: dict[str, torch.Tensor] = {}  # EMA of |s - mean|, per parameter (platon)

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current gradients into the scores; call after backward, before the optimizer step.

        One multi-tensor (``torch._foreach_*``) pass per operation over every tracked parameter, in place:
        this runs every step over the whole model (the word-embedding table included), so a per-tensor
        loop with temporaries cost a sixth of the distillation step.
        """
        self.steps += 1
        names = [n for n, p in self.params.items() if p.grad is not None]
        if not names:
            return
        for n in names:
            if n not in self.mean:
                self.mean[n] = torch.zeros_like(self.params[n], dtype=torch.float32)
                self.uncertainty[n] = torch.zeros_like(self.params[n], dtype=torch.float32)
        params = [self.params[n].detach() for n in names]
        grads = [g.detach() for g in (self.params[n].grad for n in names) if g is not None]  # names kept only params with a grad
        s = list(torch._foreach_mul(params, grads))  # s = θ · ∂L/∂θ
        torch._foreach_abs_(s)
        s = [t.float() for t in s]
        mean = [self.mean[n] for n in names]
        if self.method == "sensitivity":
            torch._foreach_lerp_(mean, s, 1.0 / self.steps)  # running mean: mean += (s - mean) / steps
            return
        torch._foreach_lerp_(mean, s, 1 - self.beta1)  # mean = β1 mean + (1 - β1) s
        if self.method == "platon":
            torch._foreach_sub_(s, mean)
            torch._foreach_abs_(s)
            torch._foreach_lerp_([self.uncertainty[n] for n in names], s, 1 - self.beta2)  # U = β2 U + (1 - β2) |s - mean|

    def parameter_scores(self) -> dict[str, torch.Tensor]:
        """The per-parameter score the chosen method ranks by."""
        if self.method == "platon":
            return {n: self.mean[n] * self.uncertainty[n] for n in self.mean}
        return dict(self.mean)

    def unit_scores(self) -> UnitScores:
        """Sum of parameter scores over each unit's slices, shaped like the masks."""
        if not self.mean:
            raise RuntimeError("no gradients seen yet: call update() after at least one backward pass")
        return aggregate(self.parameter_scores(), self.layout)

    def state_dict(self) -> dict:
        return {"method": self.method, "beta1": self.beta1, "beta2": self.beta2, "steps": self.steps,
                "mean": self.mean, "uncertainty": self.uncertainty}

    def load_state_dict(self, state: dict) -> None:
        if state["method"] != self.method:
            raise UsageError(f"checkpoint importance method {state['method']!r} differs from the recipe's {self.method!r}")
        self.steps = state["steps"]
        self.mean = {k: v.clone() for k, v in state["mean"].items()}
        self.uncertainty = {k: v.clone() for k, v in state["uncertainty"].items()}


def aggregate(param_scores: dict[str, torch.Tensor], layout: Layout) -> UnitScores:
    """Reduce per-parameter scores to per-unit scores: for each slice, sum over all other dims."""
    L, device = layout.num_layers, next(iter(param_scores.values())).device
    hidden = torch.zeros(layout.hidden, dtype=torch.float64, device=device)
    attn = torch.zeros(L, layout.num_heads * layout.head_dim, dtype=torch.float64, device=device)
    ffn = torch.zeros(L, layout.ffn, dtype=torch.float64, device=device)
    for name, score in param_scores.items():
        for s in layout.slices[name]:
            other = [d for d in range(score.dim()) if d != s.dim]
            per_unit = score.double().sum(dim=other) if other else score.double()
            if s.group == HIDDEN:
                hidden += per_unit
            elif s.group == ATTN:
                attn[s.layer] += per_unit
            elif s.group == FFN:
                ffn[s.layer] += per_unit
    return UnitScores(hidden=hidden.cpu(), attn=attn.view(L, layout.num_heads, layout.head_dim).cpu(), ffn=ffn.cpu())
