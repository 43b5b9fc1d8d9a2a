"""Materialisation: turn a masked student into a plain, dense, smaller model (HomoDistil: structured width pruning).

Every tensor is sliced to its kept units, the softmax-scale change of a shrunken head_dim is folded
into W_q/b_q, and the result is a stock ``BertConfig`` model that loads with ``AutoModel`` and
exports with optimum, with no custom code.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BertModel, PretrainedConfig
from transformers.modeling_utils import no_init_weights

from homoexport.errors import UsageError
from homoexport.pruning.mask_groups import Layout, MaskedModel, Masks, Widths


def kept_indices(masks: Masks, group: str, layer: int | None) -> torch.Tensor:
    """Sorted indices of the kept units (head-major for attention, so heads stay contiguous)."""
    return torch.nonzero(masks.unit_mask(group, layer)).flatten()


def _is_query(name: str) -> bool:
    return ".attention.self.query." in name


def sliced_state_dict(state: dict[str, torch.Tensor], layout: Layout, masks: Masks) -> dict[str, torch.Tensor]:
    """Slice every tensor of ``state`` to the kept units of ``masks``.

    If head_dim shrinks from d0 to d, scores q·k/sqrt(d0) must equal q'·k/sqrt(d): scale the query
    weight and bias by sqrt(d/d0).
    """
    q_scale = query_scale(layout, masks)
    out = {}
    for name, tensor in state.items():
        t = slice_tensor(name, tensor.detach(), layout, masks)
        if _is_query(name) and q_scale != 1.0:
            t = t * q_scale
        out[name] = t.clone().contiguous()
    return out


def query_scale(layout: Layout, masks: Masks) -> float:
    """Factor folded into W_q/b_q when head_dim shrinks from d0 to d: sqrt(d/d0) keeps the softmax input."""
    return math.sqrt(masks.widths().head_dim / layout.head_dim)


def slice_tensor(name: str, tensor: torch.Tensor, layout: Layout, masks: Masks) -> torch.Tensor:
    """``tensor`` (a parameter of ``name``, or optimizer/importance state shaped like it) cut to the kept units."""
    for s in layout.slices.get(name, []):
        tensor = tensor.index_select(s.dim, kept_indices(masks, s.group, s.layer).to(tensor.device))
    return tensor


def student_config(config: PretrainedConfig, widths: Widths) -> PretrainedConfig:
    """The teacher's config with the student's widths (a stock BertConfig when ``widths.is_stock``)."""
    new = copy.deepcopy(config)
    new.hidden_size = widths.hidden
    new.intermediate_size = widths.ffn
    new.num_attention_heads = widths.heads
    return new


def _resize_attention(model: nn.Module, layout: Layout, widths: Widths) -> None:
    """Give every attention block ``widths.heads`` heads of ``widths.head_dim`` dims.

    Only needed for intermediate (non-stock) shapes whose attention width differs from hidden, which
    a stock config cannot express; such models live in memory only (parity checks, evaluation).
    """
    for name in layout.attention_modules:
        self_attn: Any = model.get_submodule(name)
        output: Any = model.get_submodule(name.rsplit(".", 1)[0] + ".output")
        self_attn.num_attention_heads = widths.heads
        self_attn.attention_head_size = widths.head_dim
        self_attn.all_head_size = widths.attn
        for proj in ("query", "key", "value"):
            setattr(self_attn, proj, nn.Linear(widths.hidden, widths.attn))
        output.dense = nn.Linear(widths.attn, widths.hidden)


def _instantiate(model: nn.Module, config: PretrainedConfig) -> nn.Module:
    """A new, uninitialised model of ``model``'s class for ``config`` (weights come from a state dict)."""
    kwargs = {}
    if isinstance(model, BertModel):
        kwargs["add_pooling_layer"] = model.pooler is not None
    build_config = copy.deepcopy(config)
    if build_config.hidden_size % build_config.num_attention_heads:
        build_config.num_attention_heads = 1  # placeholder; _resize_attention sets the real head count
    with no_init_weights():
        new: Any = type(model)(build_config, **kwargs)  # type: ignore[call-arg]  # a PreTrainedModel class
    new.config = config
    return new


def materialize(masked: MaskedModel) -> nn.Module:
    """A dense model computing the same function as the masked student, in eval mode.

    Non-stock intermediate shapes (attention width != hidden) are supported for in-memory checks;
    :func:`save_student` refuses them.
    """
    widths = masked.masks.widths()
    teacher: Any = masked.module()
    config = student_config(teacher.config, widths)
    student: Any = _instantiate(masked.module(), config)
    if not widths.is_stock:
        _resize_attention(student, masked.layout, widths)
    state = sliced_state_dict(masked.module().state_dict(), masked.layout, masked.masks)
    missing, unexpected = student.load_state_dict(state, strict=False)
    # Non-persistent buffers (position_ids) are rebuilt by the constructor; nothing else may be missing.
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise RuntimeError(f"materialisation mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    if hasattr(student, "tie_weights"):
        student.tie_weights()
    return student.to(next(masked.module().parameters()).device).eval()


def save_student(student: nn.Module, out_dir: Path, tokenizer=None) -> Path:
    """Write a materialised student with ``save_pretrained`` (plus its tokenizer) to ``out_dir``."""
    cfg: Any = student.config
    attention: Any = student.get_submodule(_first_attention(student))
    if cfg.hidden_size % cfg.num_attention_heads or attention.all_head_size != cfg.hidden_size:
        raise UsageError("only stock shapes (heads * head_dim == hidden) can be saved as a BertConfig model")
    out_dir = Path(out_dir)
    student.save_pretrained(out_dir, safe_serialization=True)  # type: ignore[operator]  # a PreTrainedModel
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def _first_attention(model: nn.Module) -> str:
    return next(n for n, _ in model.named_modules() if n.endswith("layer.0.attention.self"))


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def parameter_report(model: nn.Module, widths: Widths) -> dict:
    """Shape and parameter counts of ``model`` for reports (paper split: embedding / backbone)."""
    c: Any = model.config
    cf = closed_form_parameters(widths, c.num_hidden_layers, c.vocab_size, c.max_position_embeddings, c.type_vocab_size,
                                pooler=getattr(getattr(model, "base_model", model), "pooler", None) is not None)
    return {"widths": widths.as_dict(), "layers": c.num_hidden_layers, "parameters": count_parameters(model),
            "embedding_parameters": cf["embedding"], "backbone_parameters": cf["backbone"]}


def closed_form_parameters(
    widths: Widths, layers: int, vocab: int, max_positions: int, type_vocab: int, pooler: bool = True, mlm_head: bool = False, num_labels: int = 0
) -> dict[str, int]:
    """Parameter count of a BERT of ``widths`` by formula, split as the paper does.

    embedding: word + position + token-type tables and their LayerNorm; backbone: the layers and the
    pooler; head: MLM transform and vocabulary bias (decoder tied) or classifier.
    """
    h, a, f = widths.hidden, widths.attn, widths.ffn
    embedding = (vocab + max_positions + type_vocab) * h + 2 * h
    per_layer = 3 * (h * a + a) + (a * h + h) + 2 * h + (h * f + f) + (f * h + h) + 2 * h
    backbone = layers * per_layer + ((h * h + h) if pooler else 0)
    head = (h * h + h + 2 * h + vocab if mlm_head else 0) + ((h * num_labels + num_labels) if num_labels else 0)
    return {"embedding": embedding, "backbone": backbone, "head": head, "total": embedding + backbone + head}


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The encoder's inputs of a training batch (labels, MLM targets and the like left out), on ``device``."""
    return {k: v.to(device) if device is not None else v for k, v in batch.items() if k in MODEL_INPUTS}


@torch.no_grad()
def parity_max_abs_diff(masked: MaskedModel, student: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """Max |masked - materialised| over every output (kept hidden dims, pooler, logits), fp32 eval.

    The invariant of the masked student: this must be <= 1e-4 at every stage.
    """
    was_training = masked.module().training
    masked.module().eval()
    student.eval()
    try:
        a, b = masked.module()(**inputs), student(**inputs)
    finally:
        masked.module().train(was_training)
    keep = masked.masks.hidden.to(next(student.parameters()).device)
    diffs = []
    for key in ("logits", "last_hidden_state", "pooler_output"):
        x, y = getattr(a, key, None), getattr(b, key, None)
        if x is None or y is None:
            continue
        if key != "logits":
            x = x[..., keep]
        diffs.append((x.float() - y.float()).abs().max().item())
    return max(diffs)
