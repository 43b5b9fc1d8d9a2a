"""Mask groups: which slice of which tensor every prunable unit owns (HomoDistil: structured width pruning).

A BERT-class encoder has three kinds of prunable width:

- ``hidden``: one mask over the residual stream, shared by every tensor that reads or writes it
  (embeddings, every layer's output projections, input projections and LayerNorms, the pooler and the
  task heads). The vocabulary dimension is never pruned.
- ``attn``, per layer: the ``num_heads * head_dim`` output rows of Q/K/V and the matching input columns
  of ``attention.output.dense``. Units are (head, dim) pairs, so whole heads and uniform per-head dims
  are both expressible.
- ``ffn``, per layer: ``intermediate.dense`` rows and ``output.dense`` columns.

The *masked student* is the unpruned model with pruned slices held at exactly zero and every LayerNorm
over the hidden stream replaced by :class:`MaskedLayerNorm`, which normalises over the kept dims only.
With that, the masked student and its materialised copy (``homoexport.pruning.surgery``) compute the same
function. Architectures are tables of name patterns registered in :data:`ARCHITECTURES` by model_type (BERT's is
:data:`BERT_RULES`); another model_type fails on load, naming the supported ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from homoexport.errors import UsageError

HIDDEN, ATTN, FFN = "hidden", "attn", "ffn"


@dataclass(frozen=True)
class TensorSlice:
    """Dimension ``dim`` of tensor ``name`` is indexed by the units of ``group`` (of ``layer``)."""

    name: str
    group: str
    layer: int | None
    dim: int
    ndim: int  # rank of the tensor (2 for Linear/Embedding weights, 1 for biases and LayerNorms)


# (pattern relative to the encoder, [(group, dim), ...]); "{L}" matches a layer index.
# An empty list means "never pruned" (e.g. vocabulary biases). Every parameter must match a rule.
BERT_RULES: list[tuple[str, list[tuple[str, int]]]] = [
    (r"embeddings\.(word|position|token_type)_embeddings\.weight", [(HIDDEN, 1)]),
    (r"embeddings\.LayerNorm\.(weight|bias)", [(HIDDEN, 0)]),
    (r"encoder\.layer\.{L}\.attention\.self\.(query|key|value)\.weight", [(ATTN, 0), (HIDDEN, 1)]),
    (r"encoder\.layer\.{L}\.attention\.self\.(query|key|value)\.bias", [(ATTN, 0)]),
    (r"encoder\.layer\.{L}\.attention\.output\.dense\.weight", [(HIDDEN, 0), (ATTN, 1)]),
    (r"encoder\.layer\.{L}\.attention\.output\.dense\.bias", [(HIDDEN, 0)]),
    (r"encoder\.layer\.{L}\.attention\.output\.LayerNorm\.(weight|bias)", [(HIDDEN, 0)]),
    (r"encoder\.layer\.{L}\.intermediate\.dense\.weight", [(FFN, 0), (HIDDEN, 1)]),
    (r"encoder\.layer\.{L}\.intermediate\.dense\.bias", [(FFN, 0)]),
    (r"encoder\.layer\.{L}\.output\.dense\.weight", [(HIDDEN, 0), (FFN, 1)]),
    (r"encoder\.layer\.{L}\.output\.dense\.bias", [(HIDDEN, 0)]),
    (r"encoder\.layer\.{L}\.output\.LayerNorm\.(weight|bias)", [(HIDDEN, 0)]),
    (r"pooler\.dense\.weight", [(HIDDEN, 0), (HIDDEN, 1)]),
    (r"pooler\.dense\.bias", [(HIDDEN, 0)]),
    # Task heads (names are relative to the whole model).
    (r"cls\.predictions\.transform\.dense\.weight", [(HIDDEN, 0), (HIDDEN, 1)]),
    (r"cls\.predictions\.transform\.dense\.bias", [(HIDDEN, 0)]),
    (r"cls\.predictions\.transform\.LayerNorm\.(weight|bias)", [(HIDDEN, 0)]),
    (r"cls\.predictions\.decoder\.weight", [(HIDDEN, 1)]),
    (r"cls\.predictions\.(decoder\.)?bias", []),
    (r"cls\.seq_relationship\.weight", [(HIDDEN, 1)]),
    (r"cls\.seq_relationship\.bias", []),
    (r"(classifier|qa_outputs)\.weight", [(HIDDEN, 1)]),
    (r"(classifier|qa_outputs)\.bias", []),
]

# LayerNorm modules over the hidden stream (they become MaskedLayerNorm in the masked student).
BERT_HIDDEN_LAYER_NORMS = (r"embeddings\.LayerNorm", r"encoder\.layer\.\d+\.attention\.output\.LayerNorm",
                           r"encoder\.layer\.\d+\.output\.LayerNorm", r"cls\.predictions\.transform\.LayerNorm")



@dataclass(frozen=True)
class Architecture:
    """How one model family lays out its prunable tensors: the slice rules, the LayerNorms over the hidden
    stream and the self-attention modules (name patterns relative to the encoder, ``\\d+`` for a layer)."""

    rules: tuple[tuple[str, tuple[tuple[str, int], ...]], ...]
    hidden_layer_norms: tuple[str, ...]
    attention: str  # one group: the layer index


# model_type -> its table. Another BERT-layout encoder is supported by registering its table here.
ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture(
        rules=tuple((pattern, tuple(spec)) for pattern, spec in BERT_RULES),
        hidden_layer_norms=BERT_HIDDEN_LAYER_NORMS,
        attention=r"encoder\.layer\.(\d+)\.attention\.self",
    ),
}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)


@dataclass
class Layout:
    """A model's prunable structure: full widths, every tensor slice, and the hidden LayerNorms."""

    num_layers: int
    hidden: int
    num_heads: int
    head_dim: int
    ffn: int
    slices: dict[str, list[TensorSlice]]  # tensor name (state_dict key) -> its slices
    layer_norms: list[str]  # module names
    attention_modules: list[str]  # per layer, the self-attention module names

    def units(self, group: str) -> int:
        """Number of units in one mask of ``group``."""
        return {HIDDEN: self.hidden, ATTN: self.num_heads * self.head_dim, FFN: self.ffn}[group]


def _compile_rules(arch: Architecture, prefix: str) -> list[tuple[re.Pattern, tuple[tuple[str, int], ...]]]:
    compiled = []
    for pattern, spec in arch.rules:
        body = pattern.replace("{L}", r"(?P<layer>\d+)")
        # Encoder tensors may sit under the base-model prefix ("bert."); head tensors never do.
        compiled.append((re.compile(rf"^(?:{re.escape(prefix)}\.)?{body}$"), spec))
    return compiled


def build_layout(model: nn.Module) -> Layout:
    """Describe ``model``'s prunable structure; fail on any parameter no rule accounts for.

    Failing loudly matters: a parameter the layout does not know would silently keep its full width
    and break materialisation (or, worse, be sliced wrongly).
    """
    config: Any = model.config  # a transformers PretrainedConfig (nn.Module's typing cannot say so)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UsageError(f"model_type {config.model_type!r} is not supported yet; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    arch = ARCHITECTURES[config.model_type]
    prefix = getattr(model, "base_model_prefix", config.model_type)
    rules = _compile_rules(arch, prefix)
    slices: dict[str, list[TensorSlice]] = {}
    unknown = []
    param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for name, tensor in model.state_dict().items():
        for pattern, spec in rules:
            m = pattern.match(name)
            if m:
                layer = int(m.group("layer")) if "layer" in pattern.groupindex else None
                slices[name] = [TensorSlice(name, group, layer if group != HIDDEN else None, dim, tensor.dim()) for group, dim in spec]
                break
        else:
            if name in param_names:
                unknown.append(name)
    if unknown:
        raise UsageError(f"do not know how to prune these parameters of {type(model).__name__}: {unknown[:5]}")

    modules = dict(model.named_modules())
    ln_patterns = [re.compile(rf"^(?:{re.escape(prefix)}\.)?{p}$") for p in arch.hidden_layer_norms]
    layer_norms = [n for n in modules if any(p.match(n) for p in ln_patterns)]
    attn_pattern = re.compile(rf"^(?:{re.escape(prefix)}\.)?{arch.attention}$")
    layer_of = {n: int(m.group(1)) for n in modules if (m := attn_pattern.match(n))}
    attention = sorted(layer_of, key=layer_of.__getitem__)
    first = modules[attention[0]]
    return Layout(
        num_layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        num_heads=first.num_attention_heads,
        head_dim=first.attention_head_size,
        ffn=config.intermediate_size,
        slices=slices,
        layer_norms=layer_norms,
        attention_modules=attention,
    )


@dataclass(frozen=True)
class Widths:
    """Kept unit counts, uniform across layers: a student shape (immutable, hashable)."""

    hidden: int
    heads: int
    head_dim: int
    ffn: int

    @property
    def attn(self) -> int:
        return self.heads * self.head_dim

    @property
    def is_stock(self) -> bool:
        """True when a stock ``BertConfig`` can express it (attention width == hidden)."""
        return self.attn == self.hidden

    def as_dict(self) -> dict[str, int]:
        return {"hidden": self.hidden, "heads": self.heads, "head_dim": self.head_dim, "ffn": self.ffn}

    def __str__(self) -> str:
        return f"hidden={self.hidden} heads={self.heads}x{self.head_dim} ffn={self.ffn}"


def full_widths(layout: Layout) -> Widths:
    return Widths(layout.hidden, layout.num_heads, layout.head_dim, layout.ffn)


def target_widths(full: Widths, hidden: int | None = None, heads: int | None = None, ffn: int | None = None) -> Widths:
    """A student shape reachable from ``full``: unspecified widths keep the teacher's; head_dim = hidden / heads.

    Fails naming the offending width, before any work is done.
    """
    hidden, heads = hidden or full.hidden, heads or full.heads
    if hidden % heads:
        raise UsageError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    target = Widths(hidden=hidden, heads=heads, head_dim=hidden // heads, ffn=ffn or full.ffn)
    for name in ("hidden", "heads", "head_dim", "ffn"):
        if not 0 < getattr(target, name) <= getattr(full, name):
            raise UsageError(f"target {name}={getattr(target, name)} must be in [1, {getattr(full, name)}] (the teacher's {name})")
    return target


def config_widths(config) -> Widths:
    """The shape a stock BertConfig describes."""
    return Widths(config.hidden_size, config.num_attention_heads, config.hidden_size // config.num_attention_heads, config.intermediate_size)


@dataclass
class Masks:
    """Boolean keep-masks (True = kept) for every group. Monotone: pruning only ever clears bits."""

    hidden: torch.Tensor  # [hidden]
    heads: torch.Tensor  # [layers, heads]
    head_dims: torch.Tensor  # [layers, heads, head_dim]; meaningful for kept heads only
    ffn: torch.Tensor  # [layers, ffn]

    @classmethod
    def full(cls, layout: Layout) -> "Masks":
        L = layout.num_layers
        return cls(
            hidden=torch.ones(layout.hidden, dtype=torch.bool),
            heads=torch.ones(L, layout.num_heads, dtype=torch.bool),
            head_dims=torch.ones(L, layout.num_heads, layout.head_dim, dtype=torch.bool),
            ffn=torch.ones(L, layout.ffn, dtype=torch.bool),
        )

    def attn(self, layer: int) -> torch.Tensor:
        """[heads * head_dim] keep-mask of one layer's attention units, head-major like Q/K/V rows."""
        return (self.heads[layer, :, None] & self.head_dims[layer]).flatten()

    def unit_mask(self, group: str, layer: int | None) -> torch.Tensor:
        if group == HIDDEN:
            return self.hidden
        assert layer is not None, f"group {group} masks are per layer"
        return self.attn(layer) if group == ATTN else self.ffn[layer]

    def widths(self) -> Widths:
        """The shape these masks describe; fails if widths differ across layers or heads."""
        heads = self.heads.sum(-1)
        dims = torch.stack([self.head_dims[l][self.heads[l]].sum(-1) for l in range(self.heads.shape[0])]) if heads.min() > 0 else None
        ffn = self.ffn.sum(-1)
        if heads.unique().numel() != 1 or ffn.unique().numel() != 1 or dims is None or dims.unique().numel() != 1:
            raise ValueError("masks are not uniform across layers/heads: the student is not a stock BERT shape")
        return Widths(int(self.hidden.sum()), int(heads[0]), int(dims.flatten()[0]), int(ffn[0]))

    def kept_heads(self) -> "KeptHeads":
        """The kept heads of a model these masks are over, which numbers its heads as the teacher does (a full-width copy)."""
        return KeptHeads(teacher=self.heads, student=self.heads)

    def clone(self) -> "Masks":
        return Masks(self.hidden.clone(), self.heads.clone(), self.head_dims.clone(), self.ffn.clone())

    def is_subset_of(self, other: "Masks") -> bool:
        """True if every unit kept here is also kept in ``other`` (monotonicity check)."""
        return all(not (a & ~b).any() for a, b in zip(self.tensors(), other.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.hidden, self.heads, self.head_dims, self.ffn)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"hidden": self.hidden, "heads": self.heads, "head_dims": self.head_dims, "ffn": self.ffn}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "Masks":
        return cls(**{k: state[k].bool().clone() for k in ("hidden", "heads", "head_dims", "ffn")})


@dataclass(frozen=True)
class KeptHeads:
    """The attention heads a student still has, in two numberings: ``teacher`` [layers, teacher heads] selects them
    among the teacher's heads, ``student`` [layers, student heads] among the heads of the model being trained (all of
    them once it is materialised at its final width)."""

    teacher: torch.Tensor
    student: torch.Tensor


def _topk_mask(scores: torch.Tensor, alive: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` highest-scoring units among the alive ones (ties broken by index, stably)."""
    if k > int(alive.sum()):
        raise ValueError(f"cannot keep {k} units: only {int(alive.sum())} are left (masks are monotone)")
    masked = torch.where(alive, scores.double(), torch.tensor(float("-inf"), dtype=torch.float64))
    order = torch.sort(masked, descending=True, stable=True).indices[:k]
    keep = torch.zeros_like(alive)
    keep[order] = True
    return keep


@dataclass
class UnitScores:
    """Importance of every unit, shaped like :class:`Masks`' unit axes."""

    hidden: torch.Tensor  # [hidden]
    attn: torch.Tensor  # [layers, heads, head_dim]
    ffn: torch.Tensor  # [layers, ffn]


def shrink(masks: Masks, scores: UnitScores, widths: Widths) -> Masks:
    """New masks that keep the most important units at ``widths``; never revives a pruned unit.

    Heads are chosen first by the summed score of their kept dims (all kept heads keep the same number
    of dims, so sums compare fairly), then each kept head keeps its best ``head_dim`` dims.
    """
    new = masks.clone()
    new.hidden = _topk_mask(scores.hidden, masks.hidden, widths.hidden)
    for l in range(masks.heads.shape[0]):
        head_scores = (scores.attn[l].double() * masks.head_dims[l]).sum(-1)  # [heads]
        new.heads[l] = _topk_mask(head_scores, masks.heads[l], widths.heads)
        for h in torch.nonzero(new.heads[l]).flatten().tolist():
            new.head_dims[l, h] = _topk_mask(scores.attn[l, h], masks.head_dims[l, h], widths.head_dim)
        new.ffn[l] = _topk_mask(scores.ffn[l], masks.ffn[l], widths.ffn)
    return new


class MaskedLayerNorm(nn.Module):
    """LayerNorm whose statistics cover only the kept hidden dims; pruned dims output exactly 0.

    A plain LayerNorm over a stream with zeroed dims divides by the full width and includes the zeros
    in the variance, so the masked student would drift from its materialised copy. Parameter names
    match ``nn.LayerNorm`` so checkpoints load either way.
    """

    def __init__(self, ln: nn.LayerNorm, keep: torch.Tensor):
        super().__init__()
        self.normalized_shape = ln.normalized_shape
        self.eps = ln.eps
        self.weight = ln.weight
        self.bias = ln.bias
        self.register_buffer("kept_index", keep.nonzero().flatten(), persistent=False)  # [kept] indices of the kept dims

    def set_keep(self, keep: torch.Tensor) -> None:
        self.kept_index = keep.nonzero().flatten().to(self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., hidden]
        idx = self.kept_index
        if idx.numel() == x.shape[-1]:  # nothing pruned
            return nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        # The fused kernel on the kept dims only, scattered back into zeros: the same statistics as the
        # materialised model's LayerNorm, in three kernels instead of a dozen elementwise ops.
        y_kept = nn.functional.layer_norm(x.index_select(-1, idx), (idx.numel(),), self.weight[idx], self.bias[idx], self.eps)  # [..., kept]
        return x.new_zeros(x.shape).index_copy(-1, idx, y_kept)


def _get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@dataclass
class MaskedModel:
    """A model prepared for masked pruning: its layout, current masks and cached per-tensor masks.

    ``model`` is None once :meth:`release` let the full-width model go (the loop trains the materialised one): the
    masks and layout still answer for widths and slicing.
    """

    model: nn.Module | None
    layout: Layout
    masks: Masks
    _tensor_masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _pruned: list[tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)  # (parameter, its mask) with a pruned slice

    def widths(self) -> Widths:
        return self.masks.widths()

    def module(self) -> nn.Module:
        """The masked model; a RuntimeError after :meth:`release`."""
        if self.model is None:
            raise RuntimeError("the masked model was released: only its masks and layout remain")
        return self.model

    def release(self) -> None:
        """Drop the reference to the full-width model (and the cached parameter list) so that it can be freed."""
        self.model, self._pruned = None, None

    def set_masks(self, masks: Masks) -> None:
        """Install new masks (must be a subset of the current ones) and zero the pruned slices."""
        if not masks.is_subset_of(self.masks):
            raise ValueError("masks must be monotone: a pruned unit can never return")
        self.masks = masks
        self._tensor_masks = tensor_masks(self.layout, masks)
        self._pruned = None
        for name in self.layout.layer_norms:
            ln = _get_module(self.module(), name)
            assert isinstance(ln, MaskedLayerNorm)
            ln.set_keep(masks.hidden)
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every pruned slice (call after each optimizer step so pruned weights stay exactly 0).

        Only tensors with a pruned slice are touched: at full width (the first part of a HomoDistil run)
        this costs nothing.
        """
        if self._pruned is None:
            if not self._tensor_masks:
                self._tensor_masks = tensor_masks(self.layout, self.masks)
            params = dict(self.module().named_parameters())
            self._pruned = [(params[n], m) for n, m in self._tensor_masks.items() if n in params and not bool(m.all())]
        for i, (param, mask) in enumerate(self._pruned):
            if mask.device != param.device or mask.dtype != param.dtype:
                # masks set before the model moved to the accelerator (resume, one-shot) follow it, once
                mask = mask.to(param.device, param.dtype)
                self._pruned[i] = (param, mask)
            param.data.mul_(mask)  # mask broadcasts: [1, in] / [out, 1] / [out]

    def pruned_weights_are_zero(self) -> bool:
        """True if every pruned slice of every parameter is exactly zero."""
        params = dict(self.module().named_parameters())
        tm = tensor_masks(self.layout, self.masks)
        return all(bool((params[n].detach()[~tm[n].bool().expand_as(params[n])] == 0).all()) for n in tm if n in params)


def tensor_masks(layout: Layout, masks: Masks) -> dict[str, torch.Tensor]:
    """For every sliced tensor, a broadcastable 0/1 float mask combining all of its slices."""
    out: dict[str, torch.Tensor] = {}
    for name, slices in layout.slices.items():
        m = None
        for s in slices:
            unit = masks.unit_mask(s.group, s.layer).float()
            shape = [1] * s.ndim
            shape[s.dim] = -1
            unit = unit.view(shape)
            m = unit if m is None else m * unit
        if m is not None:
            out[name] = m
    return out


def prepare(model: nn.Module, masks: Masks | None = None) -> MaskedModel:
    """Turn ``model`` into a masked student in place: swap hidden LayerNorms, install masks.

    The model computes exactly what it did before until a mask clears a unit.
    """
    layout = build_layout(model)
    full = Masks.full(layout)
    for name in layout.layer_norms:
        ln = _get_module(model, name)
        if isinstance(ln, nn.LayerNorm):
            _set_module(model, name, MaskedLayerNorm(ln, full.hidden))
    mm = MaskedModel(model, layout, full)
    if masks is not None:
        mm.set_masks(masks)
    return mm


def random_masks(layout: Layout, widths: Widths, generator: torch.Generator | None = None) -> Masks:
    """Random masks at ``widths`` (for tests and timing): uniform random scores, then :func:`shrink`."""
    L = layout.num_layers
    scores = UnitScores(
        hidden=torch.rand(layout.hidden, generator=generator),
        attn=torch.rand(L, layout.num_heads, layout.head_dim, generator=generator),
        ffn=torch.rand(L, layout.ffn, generator=generator),
    )
    return shrink(Masks.full(layout), scores, widths)
