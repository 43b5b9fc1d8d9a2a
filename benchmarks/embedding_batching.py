"""Which sentences share a batch decides what the in-batch similarity term can teach.

STS-B scores pairs of *related* sentences (0-5). Random in-batch sentences are almost all unrelated, so the
similarity-matrix term of the quick recipe mostly teaches the student that unrelated sentences are
unrelated. These arms hold the text, learning rate and steps fixed and change which rows share a batch:

- ``shuffled``: the sentences in a random order (today's sentence rows);
- ``pairs``: the unlabelled sentence pairs of GLUE *training* splits kept side by side (32 pairs a batch),
  so each batch holds 32 related pairs the teacher scores anywhere from near-paraphrase to loosely related;
- ``neighbours``: the same sentences grouped by the teacher's own embedding (each group an anchor and its
  7 nearest unused neighbours, 8 groups a batch), which needs no pairs: any unlabelled text will do.

The loss is similarity x10 (the MSE of the in-batch cosine matrices) unless the arm says ``+kl`` (the KL of each
row's softmax over its cosines to the others, at --temperature, which weighs each sentence's nearest rows) or
``+pair`` (similarity x10 plus x10 the MSE of each side-by-side pair's cosine to the teacher's).

Every arm starts from the teacher pruned once to 192/6/768 (no training) and trains it densely, as
embedding_objectives.py does; the score is zero-shot STS-B dev Spearman x 100 in PyTorch. No gold score is
read, and no pair containing an STS-B dev sentence is used.

    python benchmarks/embedding_batching.py --steps 200
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

from embedding_distill import sts_scores, unit
from embedding_objectives import dense_arm_parser, optimizer_step, print_arms, pruned_start, save_arm

from homoexport.atomic import atomic_write_json
from homoexport.machine import fingerprint

PAIR_TASKS = ("stsb", "mrpc", "rte")
ARMS = ("shuffled", "pairs", "neighbours", "shuffled+kl", "neighbours+kl", "pairs+pair")
GROUP = 8


def training_pairs(glue_data: Path, dev: set[str]) -> list[tuple[str, str]]:
    """Distinct (text_a, text_b) pairs of the GLUE training splits of PAIR_TASKS, none containing an STS-B dev sentence."""
    from homoexport.evaluation.glue_data import get_task, read_tsv

    pairs: list[tuple[str, str]] = []
    for name in PAIR_TASKS:
        spec = get_task(name)
        rows = read_tsv(spec, glue_data / spec.directory / "train.tsv")
        pairs += [(a, b) for a, b in zip(rows["text_a"], rows["text_b"]) if a not in dev and b not in dev]
    return list(dict.fromkeys(pairs))


# teacher_embeddings and neighbour_order are the screening as it ran: the library's grouping
# (homoexport.distillation.grouping) came after it, reads packed rows instead of strings and drops the leftover rows.
def teacher_embeddings(teacher_dir: Path, sentences: list[str], batch_size: int = 256):
    """[n, H] L2-normalised mean-pooled teacher embeddings (bf16 autocast where the CPU multiplies it natively)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    from homoexport.distillation.losses import mean_pool
    from homoexport.distillation.precision import precision_context, resolve_precision

    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    model = AutoModel.from_pretrained(str(teacher_dir)).eval()
    autocast = precision_context(resolve_precision("auto", torch.device("cpu")))
    out = []
    with torch.no_grad():
        for i in range(0, len(sentences), batch_size):
            enc = tok(sentences[i:i + batch_size], padding=True, truncation=True, max_length=64, return_tensors="pt")
            with autocast():
                hidden = model(**enc).last_hidden_state
            out.append(F.normalize(mean_pool(hidden.float(), enc["attention_mask"]), dim=-1))
    return torch.cat(out)


def neighbour_order(embeddings, seed: int = 0) -> list[int]:
    """Row order in groups of GROUP: a random unused anchor, then its GROUP-1 nearest unused rows; groups shuffled."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = len(embeddings)
    used = torch.zeros(n, dtype=torch.bool)
    groups = []
    for anchor in torch.randperm(n, generator=g).tolist():
        if used[anchor]:
            continue
        sims = embeddings @ embeddings[anchor]
        sims[used] = -2.0
        sims[anchor] = -2.0
        members = [anchor, *sims.topk(min(GROUP - 1, int((~used).sum()) - 1)).indices.tolist()]
        used[members] = True
        groups.append(members)
    return [i for k in torch.randperm(len(groups), generator=g).tolist() for i in groups[k]]


def batches(arm: str, pairs: list[tuple[str, str]], teacher_dir: Path, steps: int, batch_size: int) -> list[list[str]]:
    """``steps`` batches of ``batch_size`` sentences drawn from the pairs' sentences, grouped as ``arm`` says."""
    import random

    rng = random.Random(0)
    if arm == "pairs":
        order = list(pairs)
        rng.shuffle(order)
        flat = [s for p in order for s in p]
    else:
        sentences = list(dict.fromkeys(s for p in pairs for s in p))
        if arm == "shuffled":
            rng.shuffle(sentences)
            flat = sentences
        else:
            flat = [sentences[i] for i in neighbour_order(teacher_embeddings(teacher_dir, sentences))]
    need = steps * batch_size
    flat = (flat * (need // len(flat) + 1))[:need]
    return [flat[i:i + batch_size] for i in range(0, need, batch_size)]


def pair_cosine_mse(student, teacher):
    """MSE between student and teacher cosine of rows 2i and 2i+1 (the pairs the ``pairs`` grouping keeps side by side)."""
    import torch.nn.functional as F

    s, t = student.float(), teacher.float()
    return F.mse_loss(F.cosine_similarity(s[0::2], s[1::2], dim=-1), F.cosine_similarity(t[0::2], t[1::2], dim=-1))


def train_arm(student_dir: Path, teacher_dir: Path, out: Path, rows: list[list[str]], loss_name: str,
              args: argparse.Namespace) -> dict[str, Any]:
    """One step per batch (AdamW, 5% warmup then linear decay, lr --lr) on the pruned student: similarity x10 (``mse``),
    the row-softmax KL at temperature --temperature (``kl``), or similarity x10 plus x10 the MSE of each side-by-side
    pair's cosine (rows 2i and 2i+1) against the teacher's (``pair``: the pairs' entries weigh as much as all others)."""
    import torch
    from transformers import AutoModel, AutoTokenizer, get_scheduler

    from homoexport.distillation.losses import contrastive_kl, mean_pool, similarity_mse
    from homoexport.distillation.precision import precision_context

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    teacher = AutoModel.from_pretrained(str(teacher_dir)).eval().requires_grad_(False)
    student = AutoModel.from_pretrained(str(student_dir)).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=max(1, args.steps // 20), num_training_steps=args.steps)
    autocast = precision_context(args.precision)
    started, tokens = time.time(), 0
    for sentences in rows:
        enc = tok(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
        tokens += int(enc["attention_mask"].sum())
        with autocast():
            with torch.no_grad():
                t = mean_pool(teacher(**enc).last_hidden_state, enc["attention_mask"])
            s = mean_pool(student(**enc).last_hidden_state, enc["attention_mask"])
            if loss_name == "kl":
                loss = contrastive_kl(s, t, args.temperature)
            else:
                loss = 10.0 * similarity_mse(s, t)
                if loss_name == "pair":
                    loss = loss + 10.0 * pair_cosine_mse(s, t)
        loss.backward()
        optimizer_step(student, optimizer, scheduler)
    wall = time.time() - started
    save_arm(student, tok, teacher_dir, out)
    return {"train_s": round(wall, 1), "tokens": tokens}


def main(argv: Sequence[str] | None = None) -> int:
    ap = dense_arm_parser(__doc__)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--temperature", type=float, default=0.05, help="of the +kl arms (all-MiniLM-L6-v2 was trained at scale 20)")
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    ap.add_argument("--arms", default=",".join(ARMS))
    args = ap.parse_args(argv)

    from homoexport.evaluation.sts import stsb_dev

    dev = stsb_dev(args.glue_data)
    pairs = training_pairs(args.glue_data, {*dev.first, *dev.second})
    pruned = pruned_start(args)
    rows: list[dict[str, Any]] = [{"arm": "prune only (start)", **unit(args.work / f"prune-{args.shape}-sts.json",
                                   lambda: {"pytorch": sts_scores(pruned, dev, args.teacher)["student (PyTorch)"]})}]
    for arm in args.arms.split(","):
        out = args.work / f"batching-{args.shape}-{args.steps}x{args.batch_size}-{args.precision}-{arm}"

        def run(out: Path = out, arm: str = arm) -> dict[str, Any]:
            grouping, _, loss_name = arm.partition("+")
            rows_ = batches(grouping, pairs, args.teacher, args.steps, args.batch_size)
            trained = train_arm(pruned, args.teacher, out / "student", rows_, loss_name if loss_name in ("kl", "pair") else "mse", args)
            return {**trained, "pytorch": sts_scores(out / "student", dev, args.teacher)["student (PyTorch)"]}

        rows.append({"arm": arm, **unit(out / "result.json", run)})
        print(f"{arm}: {rows[-1]['pytorch']:.2f} ({rows[-1]['train_s']} s)", flush=True)
    atomic_write_json(args.results / "embedding_batching.json",
                      {"schema": "homoexport.benchmark.embedding_batching/1", "shape": args.shape, "steps": args.steps,
                       "batch_size": args.batch_size, "lr": args.lr, "temperature": args.temperature, "precision": args.precision, "pair_tasks": list(PAIR_TASKS),
                       "pairs": len(pairs), "metric": "STS-B dev Spearman x 100, zero-shot, PyTorch", "rows": rows,
                       "machine": fingerprint()})
    print_arms(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
