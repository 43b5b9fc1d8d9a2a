"""Distillation step throughput against the arithmetic floor, and where a step's time goes.

floor = FLOPs(teacher forward + student forward + backward) / measured matmul GFLOP/s of this machine.
The step is timed whole (median over steps) and in parts (shares of the summed time) (teacher, student forward + losses, backward, importance update,
optimizer + re-masking) at the quickstart shapes: the student at full width (start of HomoDistil), masked at the target width, and
dense at the target width (materialised, as a task run continues once the target is reached; its floor
counts the small student's FLOPs). Prints a table and writes JSON.

    python benchmarks/train_throughput.py --teacher ../shared/models/all-MiniLM-L6-v2 --out benchmarks/results/train_throughput.json
    python benchmarks/train_throughput.py --teacher ../shared/models/all-MiniLM-L6-v2 --precision fp32,bf16 --steps 20 \
        --out benchmarks/results/train_throughput_bf16.json

With ``--precision bf16`` the forward passes and losses run under bf16 autocast, as ``training.precision: bf16``
trains; the fp32 floor stays the common scale, and those rows also give the ratio to the bf16 GEMM floor.
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
from homoexport.distillation.data import BlockBatcher
from homoexport.distillation.losses import DistillationLoss
from homoexport.distillation.models import load_model, load_tokenizer
from homoexport.distillation.precision import precision_context
from homoexport.distillation.trainer import DistillModule, adamw, teacher_outputs
from homoexport.machine import fingerprint
from homoexport.pruning.importance import ImportanceTracker
from homoexport.pruning.mask_groups import KeptHeads, Widths, full_widths, prepare, random_masks
from homoexport.pruning.oneshot import synthetic_blocks
from homoexport.pruning.surgery import materialize


def matmul_gflops(n: int = 1024, repeats: int = 20, trials: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Sustained GEMM rate of this machine in ``dtype`` with torch's current thread count: the best of
    ``trials`` timings, so that a trial slowed by another process does not lower the floor."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        rates.append(2 * n**3 * repeats / (time.perf_counter() - t) / 1e9)
    return max(rates)


def forward_flops(widths: Widths, layers: int, batch: int, seq: int, mlm_tokens: int = 0, vocab: int = 0) -> float:
    """Matmul FLOPs of one encoder forward: Q/K/V/O and FFN projections plus attention scores/context."""
    tokens = batch * seq
    h, a, f = widths.hidden, widths.attn, widths.ffn
    per_layer = 2 * tokens * (3 * h * a + a * h + 2 * h * f) + 2 * 2 * batch * seq * seq * a
    return layers * per_layer + 2 * mlm_tokens * (h * h + h * vocab)


def timed(fn, sync=lambda: None):
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def measure(teacher_path: str, widths_name: str, target: Widths, batch: int, seq: int, steps: int, precision: str,
            compiled: bool = False) -> dict:
    teacher, has_mlm = load_model(teacher_path, attention="eager")
    teacher.requires_grad_(False).eval()
    tokenizer = load_tokenizer(teacher_path)
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    masked = prepare(student)
    full = full_widths(masked.layout)
    widths = full if widths_name == "full" else target
    if widths != full:
        masked.set_masks(random_masks(masked.layout, widths, torch.Generator().manual_seed(0)))
    loss = DistillationLoss(LossSpec(), full.hidden, full.hidden, teacher.config.num_hidden_layers, teacher.config.num_hidden_layers, has_mlm)
    dense = widths_name == "dense"
    if dense:  # the materialised student a task run continues on once the target width is reached for good
        student = materialize(masked).train().requires_grad_(True)
        loss.keep_student_dims(masked.masks.hidden.nonzero().flatten())
    heads = KeptHeads(masked.masks.heads, torch.ones(target.heads, dtype=torch.bool).repeat(len(masked.masks.heads), 1)) if dense \
        else masked.masks.kept_heads()
    module = DistillModule(student, loss, None)
    if compiled:  # torch.compile (inductor) of the student + losses and of the teacher, in place (nn.Module.compile)
        module.compile()
        teacher.compile()
    tracker = ImportanceTracker(student, masked.layout, "platon") if not dense else None
    optimizer = adamw(module.parameters(), OptimizerSpec(), torch.device("cpu"))  # as the trainer builds it
    batcher = BlockBatcher(synthetic_blocks(tokenizer, batch * (steps + 4), seq), tokenizer, batch, mlm_probability=0.15 if has_mlm else None)
    autocast = precision_context(precision)
    warmup = 3 if compiled else 1  # the first compiled steps compile (and recompile once the shapes are marked dynamic)
    parts = {"teacher": 0.0, "student_forward_and_losses": 0.0, "backward": 0.0, "importance": 0.0, "optimizer_and_masking": 0.0}
    total, step_times = 0.0, []
    compile_s = 0.0
    for step in range(steps + warmup):
        batch_ = batcher.batch_at(step)
        t0 = time.perf_counter()
        with autocast():  # as the trainers run the forward passes and losses
            t_out, dt_t = timed(lambda: teacher_outputs(teacher, batch_, loss, None))
            (value, _), dt_s = timed(lambda: module(batch_, t_out, heads))
        _, dt_b = timed(lambda: value.backward())
        _, dt_i = timed(tracker.update if tracker is not None else lambda: None)

        def opt():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not dense:
                masked.apply()

        _, dt_o = timed(opt)
        if step < warmup:
            compile_s += time.perf_counter() - t0
            continue  # warm-up
        step_times.append(time.perf_counter() - t0)
        total += step_times[-1]
        for k, v in zip(parts, (dt_t, dt_s, dt_b, dt_i, dt_o)):
            parts[k] += v
    c = teacher.config
    teacher_flops = forward_flops(full, c.num_hidden_layers, batch, seq)
    # A masked student computes at full width (zeros are multiplied too): its FLOPs are the teacher's.
    student_flops = 3 * forward_flops(widths if dense else full, c.num_hidden_layers, batch, seq)
    step_s = statistics.median(step_times)  # robust to a step slowed by another process on a shared machine
    return {"widths": widths.as_dict(), "precision": precision, "compiled": compiled, "warmup_s": compile_s, "batch": batch, "seq": seq, "step_s": step_s, "tokens_per_s": batch * seq / step_s,
            "teacher_gflop": teacher_flops / 1e9, "student_fwd_bwd_gflop": student_flops / 1e9,
            "share": {k: v / total for k, v in parts.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="teacher model directory (e.g. ../shared/models/all-MiniLM-L6-v2)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--precision", default="fp32", help="comma-separated fp32,bf16: the precisions to time (bf16 = autocast, as "
                    "training.precision bf16 runs; its rows also give the ratio to the bf16 GEMM floor)")
    ap.add_argument("--compile", action="store_true", help="add a row of the dense stage under torch.compile: the student + losses "
                    "and the teacher compiled, timed after the compiling warm-up steps (whether compiling would pay)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/train_throughput.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    precisions = args.precision.split(",")
    if unknown := set(precisions) - {"fp32", "bf16"}:
        ap.error(f"unknown precision(s) {sorted(unknown)}; allowed: fp32, bf16")
    gflops = matmul_gflops()
    bf16_gflops = matmul_gflops(dtype=torch.bfloat16) if "bf16" in precisions else None
    target = Widths(args.hidden, args.heads, args.hidden // args.heads, args.ffn)
    rows = []
    for precision in precisions:
        for name, compiled in [("full", False), ("target", False), ("dense", False), *([("dense", True)] if args.compile else [])]:
            r = measure(args.teacher, name, target, args.batch, args.seq, args.steps, precision, compiled)
            # The floor stays the fp32 GEMM rate's, so that rows of both precisions compare on one scale.
            floor_s = (r["teacher_gflop"] + r["student_fwd_bwd_gflop"]) / gflops
            r.update(stage=name + (" compiled" if compiled else ""), floor_step_s=floor_s, floor_tokens_per_s=args.batch * args.seq / floor_s, ratio_to_floor=r["step_s"] / floor_s)
            if precision == "bf16":
                r["ratio_to_bf16_floor"] = r["step_s"] / ((r["teacher_gflop"] + r["student_fwd_bwd_gflop"]) / bf16_gflops)
            rows.append(r)
    bf16_note = f"; bf16 {bf16_gflops:.1f} GFLOP/s" if bf16_gflops else ""
    print(f"machine matmul: fp32 {gflops:.1f} GFLOP/s{bf16_note} ({torch.get_num_threads()} threads); "
          f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    print("| student | precision | step s | tokens/s | fp32 floor tokens/s | x fp32 floor | x bf16 floor | teacher | student fwd+loss | backward "
          "| importance | optim+mask |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["share"]
        bf16_ratio = f"{r['ratio_to_bf16_floor']:.2f}" if "ratio_to_bf16_floor" in r else "-"
        print(f"| {r['stage']} {r['widths']['hidden']}/{r['widths']['heads']}/{r['widths']['ffn']} | {r['precision']} | {r['step_s']:.2f} | "
              f"{r['tokens_per_s']:.0f} | {r['floor_tokens_per_s']:.0f} | {r['ratio_to_floor']:.2f} | {bf16_ratio} | {s['teacher']:.0%} | "
              f"{s['student_forward_and_losses']:.0%} | {s['backward']:.0%} | {s['importance']:.0%} | {s['optimizer_and_masking']:.0%} |")
    atomic_write_json(args.out, {"schema": "homoexport.benchmark.train_throughput/2", "matmul_gflops": gflops, "bf16_matmul_gflops": bf16_gflops,
                                 "threads": torch.get_num_threads(), "rows": rows,
                                 "load_average_1m": {"start": load_before, "end": os.getloadavg()[0]}, "machine": fingerprint()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
