"""Loading teachers and students, building the initial student, and the forward pass the losses read."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from homoexport.distillation.losses import EncoderOutputs
from homoexport.errors import UsageError


class ModelLoadError(UsageError):
    """A model or tokenizer that cannot be loaded, with the path and the reason."""


def _checkpoint_keys(path: Path) -> set[str] | None:
    """Tensor names in a local checkpoint, read without loading weights (None if not determinable)."""
    st = path / "model.safetensors"
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), framework="pt") as f:
            return set(f.keys())
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    return None


def has_mlm_head(path: str | Path) -> bool:
    """True if the checkpoint carries a masked-LM head (a sentence encoder such as MiniLM does not)."""
    keys = _checkpoint_keys(Path(path)) if Path(path).is_dir() else None
    if keys is not None:
        return any(".predictions.transform." in k or k.startswith("lm_head.") for k in keys)
    archs = getattr(_config(path), "architectures", None) or []
    return any("MaskedLM" in a or "PreTraining" in a for a in archs)


def _config(path: str | Path):
    """The model's config; a directory that is not there (or a hub name that cannot be reached) is a usage error."""
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load model {path}: not a local directory with config.json, and not loadable from the hub "
                             f"({str(err).splitlines()[0]})") from None


def is_sequence_classifier(path: str | Path) -> bool:
    """True if the checkpoint is a ``*ForSequenceClassification`` model (a fine-tuned task teacher)."""
    archs = getattr(_config(path), "architectures", None) or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def _check_exists(path: str | Path) -> None:
    p = Path(path)
    looks_local = p.is_absolute() or str(path).startswith(".") or p.exists() or len(p.parts) > 2
    if looks_local and not (p / "config.json").is_file():
        raise ModelLoadError(f"model directory not found or has no config.json: {p}")


def load_model(path: str | Path, attention: str = "sdpa", mlm: bool | None = None) -> tuple[PreTrainedModel, bool]:
    """Load a BERT-class model with its MLM head when it has one. Returns (model, has_mlm).

    ``attention="eager"`` is needed when attention probabilities are distilled.
    """
    _check_exists(path)
    if mlm is None and is_sequence_classifier(path):
        # A fine-tuned classifier keeps its head: it reads the residual stream and is pruned with it.
        cls, want_mlm = AutoModelForSequenceClassification, False
    else:
        want_mlm = has_mlm_head(path) if mlm is None else mlm
        cls = AutoModelForMaskedLM if want_mlm else AutoModel
    try:
        model = cls.from_pretrained(str(path), attn_implementation=attention)
    except OSError as err:
        raise ModelLoadError(f"cannot load model {path}: {err}") from None
    return model, want_mlm


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    _check_exists(path)
    try:
        return AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load tokenizer from {path}: {err}") from None


def base_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(encoder, MLM head or None) of a BERT-class model."""
    base = getattr(model, "base_model", model)
    head = getattr(model, "cls", None)
    return base, head


def encode(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    attentions: bool = False,
    mlm_positions: torch.Tensor | None = None,
    relation_layer: int | None = None,
) -> EncoderOutputs:
    """One forward pass exposing hidden states, optionally attentions, MLM logits at ``mlm_positions``
    (a [B, T] bool mask; the vocabulary projection runs on those rows only) and the Q/K/V outputs of
    ``relation_layer`` (0-based, negative from the end) for relation transfer."""
    base, head = base_and_head(model)
    captured: dict[str, torch.Tensor] = {}
    handles = []
    if relation_layer is not None:
        attn = base.encoder.layer[relation_layer].attention.self
        for name in ("query", "key", "value"):
            handles.append(getattr(attn, name).register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o)))
    try:
        out = base(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], token_type_ids=inputs.get("token_type_ids"),
            output_hidden_states=True, output_attentions=attentions, return_dict=True,
        )
    finally:
        for h in handles:
            h.remove()
    logits = None
    if head is not None and mlm_positions is not None:
        logits = head(out.last_hidden_state[mlm_positions])  # [N_masked, V]
    qkv = (captured["query"], captured["key"], captured["value"]) if relation_layer is not None else None
    return EncoderOutputs(hidden=out.hidden_states, attentions=out.attentions if attentions else None, mlm_logits=logits, relation_qkv=qkv)


def evenly_spaced_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """DistilBERT-style choice of teacher layers to copy (12 -> 6 gives 0, 2, 4, 7, 9, 11)."""
    if student_layers == 1:
        return [teacher_layers - 1]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def build_student(teacher: PreTrainedModel, init: str, layers: int | None = None, truncate_layers: list[int] | None = None,
                  widths: dict[str, int] | None = None, seed: int = 0) -> PreTrainedModel:
    """The student before distillation.

    copy: an exact copy of the teacher (HomoDistil); truncate: a copy keeping ``truncate_layers`` (or
    evenly spaced ones) at full width; random: a fresh model of the teacher's class with ``layers`` and
    ``widths`` (hidden/heads/ffn), for baselines that distill into a randomly initialised student.
    """
    n_teacher = teacher.config.num_hidden_layers
    if init == "copy":
        return copy.deepcopy(teacher)
    if init == "truncate":
        keep = truncate_layers or evenly_spaced_layers(n_teacher, layers or max(1, n_teacher // 2))
        bad = [i for i in keep if not 0 <= i < n_teacher]
        if bad:
            raise UsageError(f"truncate_layers {bad} out of range for a {n_teacher}-layer teacher")
        student = copy.deepcopy(teacher)
        base, _ = base_and_head(student)
        base.encoder.layer = nn.ModuleList(base.encoder.layer[i] for i in keep)
        for new_index, layer in enumerate(base.encoder.layer):
            layer.attention.self.layer_idx = new_index
        student.config.num_hidden_layers = len(keep)
        return student
    if init == "random":
        config = copy.deepcopy(teacher.config)
        config.num_hidden_layers = layers or n_teacher
        if widths:
            config.hidden_size, config.num_attention_heads, config.intermediate_size = widths["hidden"], widths["heads"], widths["ffn"]
        torch.manual_seed(seed)
        return type(teacher)(config)
    raise UsageError(f"init must be copy, truncate or random, not {init!r}")


def quiet_transformers() -> None:
    """Silence transformers' info chatter in CLI runs; warnings still show."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
