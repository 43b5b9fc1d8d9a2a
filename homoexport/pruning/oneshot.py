"""One-shot importance pruning without training: ``homoexport prune``.

Scores every unit by the sensitivity of the step-0 distillation objective (the unpruned model as its
own teacher, dropout active so the gradients are informative; plus the MLM loss when there is an MLM
head) over a few batches, keeps the most important units at the target shape, materialises a dense
stock BERT and checks it against the masked model.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch

from homoexport.atomic import atomic_write_json, staging_dir
from homoexport.config.recipe import LossSpec
from homoexport.distillation.data import BlockBatcher, CorpusSpec, build_blocks
from homoexport.distillation.losses import DistillationLoss
from homoexport.distillation.models import load_model, load_tokenizer
from homoexport.distillation.trainer import DistillModule, teacher_outputs
from homoexport.errors import OutputExistsError
from homoexport.pruning.mask_groups import config_widths, target_widths
from homoexport.pruning.pruner import HomoDistilPruner, PrunerSettings
from homoexport.pruning.surgery import count_parameters, model_inputs, parameter_report, save_student


def synthetic_blocks(tokenizer, n_blocks: int, block_size: int, seed: int = 0) -> np.ndarray:
    """[n_blocks, block_size] random non-special token ids framed by [CLS] ... [SEP] (no text needed)."""
    rng = np.random.default_rng(seed)
    special = set(tokenizer.all_special_ids)
    vocab = np.array([i for i in range(len(tokenizer)) if i not in special])
    blocks = rng.choice(vocab, size=(n_blocks, block_size))
    blocks[:, 0], blocks[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    return blocks.astype(np.int32)


def prune_model(
    model_path: str | Path,
    out_dir: str | Path,
    hidden: int | None = None,
    heads: int | None = None,
    ffn: int | None = None,
    data: list[str] | None = None,
    batches: int = 8,
    batch_size: int = 8,
    block_size: int = 128,
    importance: str = "sensitivity",
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prune ``model_path`` once to (hidden, heads, ffn) and write a loadable model + prune_report.json.

    Unspecified widths keep the model's. ``data`` are text files scored on; None uses synthetic ids.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise OutputExistsError(f"output directory already exists: {out_dir} (pass --overwrite to replace it)")
    torch.manual_seed(seed)
    model, has_mlm = load_model(model_path, attention="eager")
    tokenizer = load_tokenizer(model_path)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    full = config_widths(model.config)
    target = target_widths(full, hidden, heads, ffn)
    pruner = HomoDistilPruner(model, target, PrunerSettings(total_steps=1, schedule="one_shot", importance=importance))

    if data:
        blocks, _ = build_blocks(CorpusSpec(sources=data, block_size=block_size, eval_blocks=0, max_blocks=batches * batch_size), tokenizer)
        source = f"{len(blocks)} blocks from {', '.join(data)}"
    else:
        blocks = synthetic_blocks(tokenizer, batches * batch_size, block_size, seed)
        source = f"{len(blocks)} synthetic blocks (random token ids)"
    batcher = BlockBatcher(blocks, tokenizer, batch_size, seed=seed, mlm_probability=0.15 if has_mlm else None)

    loss = DistillationLoss(LossSpec(), full.hidden, full.hidden, model.config.num_hidden_layers, model.config.num_hidden_layers, has_mlm)
    module = DistillModule(model, loss, relation_layer=None).train()
    for step in range(min(batches, batcher.steps_per_epoch)):
        batch = batcher.batch_at(step)
        total, _ = module(batch, teacher_outputs(teacher, batch, loss, None), None)
        total.backward()
        pruner.importance.update()
        module.zero_grad(set_to_none=True)
    pruner.prune_to_target()
    model.eval()
    student, parity = pruner.materialize_checked(model_inputs(batcher.batch_at(0)))
    report = {
        "schema": "homoexport.prune/1",
        "model": str(model_path),
        "before": parameter_report(teacher, full),
        "after": parameter_report(student, target),
        "parameter_ratio": count_parameters(student) / count_parameters(teacher),
        "importance": importance,
        "scored_on": source,
        "parity_max_abs_diff": parity,
        "has_mlm_head": has_mlm,
    }
    with staging_dir(out_dir, overwrite=overwrite) as tmp:
        save_student(student, tmp, tokenizer)
        atomic_write_json(tmp / "prune_report.json", report)
    return report
