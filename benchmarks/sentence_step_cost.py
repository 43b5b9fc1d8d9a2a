"""What a sentence-level distillation step costs, with and without the teacher's vectors kept and length runs.

When every weighed term reads only pooled sentence embeddings (``similarity``, ``contrastive``, ``sentence``), the
trainer embeds every training row with the teacher once before step 1 and reads the vectors back by row
(``homoexport.distillation.sentence_targets``), and the student encodes each batch in runs of rows of like length.
This script times both kinds of step side by side, interleaved step by step on the same batches, from the same
dense 192/6/768 student (pruned once from the teacher): "before", the teacher run on every batch and the student on
the padded batch; "after", the vectors read back and the student in length runs. Forward, loss, backward and the
AdamW step are timed (median over steps); before the first step both ways compute the loss of the same student
without dropout, which must agree.
Prints a table and writes JSON.

    python benchmarks/sentence_step_cost.py --teacher ../shared/models/all-MiniLM-L6-v2 \
        --text runs/embedding_bench/in-domain-stsb-mrpc-rte-sst2.txt ../shared/data/corpus/wikipedia-en-wikiextractor \
        --cache-dir .cache/homoexport --out benchmarks/results/sentence_step_cost.json

(the rows of the in-domain embedding runs: ``embedding_distill.py --in-domain stsb,mrpc,rte,sst2`` writes that text
file, and Wikipedia fills the rows up to 40,000; any text will do).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import torch

from homoexport.atomic import atomic_write_json
from homoexport.config.recipe import LossSpec, OptimizerSpec
from homoexport.distillation.data import BlockBatcher, CorpusSpec, build_blocks
from homoexport.distillation.grouping import Grouping, teacher_neighbour_groups
from homoexport.distillation.losses import DistillationLoss
from homoexport.distillation.models import encode, load_model, load_tokenizer
from homoexport.distillation.sentence_targets import teacher_sentence_targets
from homoexport.distillation.trainer import DistillModule, adamw, teacher_outputs
from homoexport.machine import fingerprint
from homoexport.pruning.mask_groups import Widths, prepare, random_masks
from homoexport.pruning.surgery import materialize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--text", required=True, nargs="+", help="sentences, one per line (files, folders, as data.train reads them)")
    ap.add_argument("--rows", type=int, default=40000, help="sentence rows to draw batches from, as embedding_distill.py caps them")
    ap.add_argument("--cache-dir", default=None, help="data.cache_dir of earlier runs, to reuse their packed rows and vectors")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sentence_step_cost.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]

    teacher, _ = load_model(args.teacher)
    teacher.requires_grad_(False).eval()
    tokenizer = load_tokenizer(args.teacher)
    rows, _ = build_blocks(CorpusSpec(sources=args.text, block_size=args.block_size, max_blocks=args.rows, eval_blocks=0,
                                      unit="sentence", cache_dir=args.cache_dir), tokenizer)
    started = time.perf_counter()
    sentences = teacher_sentence_targets(teacher, rows, tokenizer.pad_token_id, "fp32", args.cache_dir)
    embed_s = time.perf_counter() - started
    groups = teacher_neighbour_groups(teacher, rows, tokenizer.pad_token_id, Grouping(), args.cache_dir, pooled=sentences)
    batcher = BlockBatcher(rows, tokenizer, args.batch, mlm_probability=None, padded=True, groups=groups)

    masked = prepare(copy.deepcopy(teacher))
    masked.set_masks(random_masks(masked.layout, Widths(hidden=192, heads=6, head_dim=32, ffn=768), torch.Generator().manual_seed(0)))
    start = materialize(masked)
    spec = LossSpec(mlm=0, kl=0, hidden=0, attention=0, embedding=0, contrastive=1.0)
    arms = {}
    for name in ("before", "after"):
        student = copy.deepcopy(start).train().requires_grad_(True)
        module = DistillModule(student, DistillationLoss(spec, 192, teacher.config.hidden_size, 6, 6, False), None)
        arms[name] = (module, adamw(module.parameters(), OptimizerSpec(lr=1e-4), torch.device("cpu")))

    def loss_of(name: str, batch: dict) -> torch.Tensor:
        module = arms[name][0]
        if name == "before":
            t_out = teacher_outputs(teacher, batch, module.loss, None)
            out = encode(module.student, {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
            return module.loss(out, t_out, batch["attention_mask"], None, None)[0]
        return module(batch, teacher_outputs(teacher, batch, module.loss, None, sentences), None)[0]

    with torch.no_grad():  # the same student, without dropout: the two ways must give the same loss
        for module, _ in arms.values():
            module.eval()
        first_loss = {name: float(loss_of(name, batcher.batch_at(0))) for name in arms}
        for module, _ in arms.values():
            module.train()
    times: dict[str, list[float]] = {"before": [], "after": []}
    for s in range(args.steps + 1):
        batch = batcher.batch_at(s)
        for name in (("before", "after") if s % 2 == 0 else ("after", "before")):  # alternate who goes first
            module, optimizer = arms[name]
            t0 = time.perf_counter()
            loss_of(name, batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if s:  # step 0 warms up
                times[name].append(time.perf_counter() - t0)
    padded_tokens = args.batch * args.block_size
    real = float((rows != tokenizer.pad_token_id).sum(1).mean())
    rows_out = []
    for name, label in (("before", "teacher each step, student on the padded batch"), ("after", "vectors read back, student in length runs")):
        rows_out.append({"arm": name, "what": label, "step_s": statistics.median(times[name]), "first_loss": first_loss[name]})
    ratio = rows_out[1]["step_s"] / rows_out[0]["step_s"]
    report = {"schema": "homoexport.bench.sentence_step_cost/1", "teacher": args.teacher, "text": args.text, "rows": len(rows),
              "batch": args.batch, "block_size": args.block_size, "mean_real_tokens_per_row": real, "padded_tokens_per_batch": padded_tokens,
              "steps": args.steps, "teacher_embedding_s": round(embed_s, 2), "arms": rows_out, "after_over_before": ratio,
              "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0], "threads": torch.get_num_threads(), "machine": fingerprint()}
    print(f"{'arm':<52} {'step s':>8} {'first loss':>11}")
    for r in rows_out:
        print(f"{r['what']:<52} {r['step_s']:>8.3f} {r['first_loss']:>11.6f}")
    print(f"after / before: {ratio:.2f}   ({len(rows):,} rows, {real:.1f} real tokens a row of {args.block_size}; teacher embedded them in {embed_s:.1f} s)")
    atomic_write_json(args.out, report)


if __name__ == "__main__":
    main()
