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

A pruned weight is held at 0, so its sensitivity is 0 from then on and its running scores decay by a fixed
recurrence; while it is in the model they still count towards the units it shares with kept ones (a pruned FFN
row still adds to the hidden dims it reads). When a loop goes on over the materialised model (:meth:`rebased`),
those weights leave it, and :class:`Residue` carries the closed form of what they would still add, so that a
rebased tracker ranks units exactly as the masked one does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from homoexport.errors import UsageError
from homoexport.pruning.mask_groups import ATTN, FFN, HIDDEN, Layout, Masks, UnitScores, tensor_masks

Method = Literal["sensitivity", "ema", "platon"]
METHODS: tuple[str, ...] = ("sensitivity", "ema", "platon")


@dataclass
class Residue:
    """Per unit, what the scores of weights that left the model at update ``steps`` still add: with sensitivity 0 from
    then on, ``ema`` and ``sensitivity`` scores are ``first`` times a decay, and PLATON's mean × uncertainty is a mix of
    ``first`` (Σ mean·uncertainty) and ``second`` (Σ mean²) when they left."""

    steps: int
    first: UnitScores
    second: UnitScores

    def state_dict(self) -> dict:
        return {"steps": self.steps, "first": vars(self.first), "second": vars(self.second)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Residue":
        return cls(state["steps"], UnitScores(**state["first"]), UnitScores(**state["second"]))


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
        self.residues: list[Residue] = []  # of weights that left the model at a rebase

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
        """Sum of parameter scores over each unit's slices (and what weights that left the model still add), shaped like
        the masks."""
        if not self.mean:
            raise RuntimeError("no gradients seen yet: call update() after at least one backward pass")
        scores = aggregate(self.parameter_scores(), self.layout)
        for r in self.residues:
            f1, f2 = self._decay(self.steps - r.steps, r.steps)
            for key in ("hidden", "attn", "ffn"):
                getattr(scores, key).add_(getattr(r.first, key), alpha=f1).add_(getattr(r.second, key), alpha=f2)
        return scores

    def _decay(self, k: int, t: int) -> tuple[float, float]:
        """Factors of a residue's ``first`` and ``second`` after ``k`` updates with sensitivity 0 (it left at update ``t``).

        ema: m ← β1·m. sensitivity: m ← m·(1 − 1/steps), so m·t/(t+k). platon: m ← β1·m, then U ← β2·U + (1 − β2)·m, so
        m·U after k updates is (β1β2)^k·m·U + β1^k·(1 − β2)·Σ_{i=1..k} β2^(k−i)·β1^i·m².
        """
        b1, b2 = self.beta1, self.beta2
        if self.method == "sensitivity":
            return t / (t + k), 0.0
        if self.method == "ema":
            return b1**k, 0.0
        geometric = k * b1**k if b1 == b2 else b1 * (b2**k - b1**k) / (b2 - b1)
        return (b1 * b2) ** k, b1**k * (1 - b2) * geometric

    def rebased(self, model: nn.Module, layout: Layout, masks: Masks) -> "ImportanceTracker":
        """This tracker over ``model``, the materialisation of the masked model at ``masks`` (``layout`` is the new model's):
        scores cut to the kept units, and what the weights that leave still add kept as a :class:`Residue`.

        Sensitivity |θ·∂L/∂θ| does not change when the materialisation rescales W_q, so nothing is rescaled.
        """
        from homoexport.pruning.surgery import slice_tensor  # surgery imports the mask groups this module builds on

        left = {n: 1.0 - m for n, m in tensor_masks(self.layout, masks).items() if n in self.mean}
        if self.method == "platon":
            first = {n: self.mean[n] * self.uncertainty[n] * left[n].to(self.mean[n].device) for n in left}
            second = {n: self.mean[n].square() * left[n].to(self.mean[n].device) for n in left}
        else:
            first = {n: self.mean[n] * left[n].to(self.mean[n].device) for n in left}
            second = {n: torch.zeros_like(v) for n, v in first.items()}
        new = ImportanceTracker(model, layout, self.method, self.beta1, self.beta2)  # type: ignore[arg-type]
        new.steps = self.steps
        new.mean = {n: slice_tensor(n, v, self.layout, masks).contiguous() for n, v in self.mean.items()}
        new.uncertainty = {n: slice_tensor(n, v, self.layout, masks).contiguous() for n, v in self.uncertainty.items()}
        residues = [*self.residues, Residue(self.steps, aggregate(first, self.layout), aggregate(second, self.layout))] if first else self.residues
        new.residues = [Residue(r.steps, kept_units(r.first, masks), kept_units(r.second, masks)) for r in residues]
        return new

    def state_dict(self) -> dict:
        return {"method": self.method, "beta1": self.beta1, "beta2": self.beta2, "steps": self.steps,
                "mean": self.mean, "uncertainty": self.uncertainty, "residues": [r.state_dict() for r in self.residues]}

    def load_state_dict(self, state: dict) -> None:
        if state["method"] != self.method:
            raise UsageError(f"checkpoint importance method {state['method']!r} differs from the recipe's {self.method!r}")
        self.steps = state["steps"]
        self.mean = {k: v.clone() for k, v in state["mean"].items()}
        self.uncertainty = {k: v.clone() for k, v in state["uncertainty"].items()}
        self.residues = [Residue.from_state_dict(r) for r in state.get("residues", [])]


def kept_units(scores: UnitScores, masks: Masks) -> UnitScores:
    """``scores`` of the units ``masks`` keep, shaped like the masks of the materialised model."""
    layers = range(masks.heads.shape[0])
    attn = torch.stack([torch.stack([scores.attn[layer, h][masks.head_dims[layer, h]] for h in masks.heads[layer].nonzero().flatten().tolist()])
                        for layer in layers])
    return UnitScores(hidden=scores.hidden[masks.hidden], attn=attn, ffn=torch.stack([scores.ffn[layer][masks.ffn[layer]] for layer in layers]))


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
