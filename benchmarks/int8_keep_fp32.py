"""What leaving layer groups in fp32 costs and buys in the int8 file: GLUE dev score vs batch-1 latency.

For a fine-tuned classifier (``homoexport glue`` writes one to ``OUT/<task>/seed-S/model``) this exports
the model once per variant with ``homoexport.deployment.export.export_model`` (O2, dynamic int8, per-channel):
  - ``int8``: every MatMul quantized (the default),
  - ``int8 keep ffn-output``: the FFN down-projections stay fp32 (``--keep-fp32 ffn-output``),
and scores the fp32 ONNX file and each int8 file on the task's dev set with onnxruntime, then times every
file at batch 1 / seq 128 in interleaved rounds (p50 = median of the rounds' p50s), so load from other
processes hits all variants alike. Prints one table and writes benchmarks/results/int8_keep_fp32.json.

    python benchmarks/int8_keep_fp32.py runs/glue-minilm/cola/seed-42/model --task cola
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from datasets import DatasetDict
from rich.console import Console
from rich.table import Table

from homoexport.atomic import atomic_write_json
from homoexport.deployment.bench import load_session, measure_latency
from homoexport.deployment.export import QUANTIZED_FILE, ExportSettings, export_model
from homoexport.evaluation.glue import evaluate_onnx, load_data
from homoexport.evaluation.glue_data import get_task
from homoexport.machine import fingerprint

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"int8": (), "int8 keep ffn-output": ("ffn-output",)}


def interleaved_p50(paths: dict[str, Path], rounds: int, repeats: int, seq: int) -> dict[str, float]:
    """Median over ``rounds`` of each file's p50 at batch 1 / ``seq``; files alternate within a round."""
    sessions = {name: load_session(p) for name, p in paths.items()}
    p50s: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, path in paths.items():
            p50s[name].append(measure_latency(path, batch=1, seq=seq, session=sessions[name], warmup=5, repeats=repeats).p50_ms)
    return {name: float(np.median(v)) for name, v in p50s.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="a fine-tuned sequence-classification model directory")
    ap.add_argument("--task", required=True, help="GLUE task the model was fine-tuned on (cola, sst2, mrpc, ...)")
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/data/glue"), help="GLUE data in the original TSV layout")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    ap.add_argument("--repeats", type=int, default=30, help="timed runs per file per round")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "int8_keep_fp32.json")
    args = ap.parse_args(argv)
    if not (args.model / "config.json").is_file():
        ap.error(f"not a model directory (no config.json): {args.model}")

    task = get_task(args.task)
    data = load_data(task, args.data_dir)
    dev = DatasetDict({split: data[split] for split in task.dev_splits})
    console = Console()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="homoexport-keep-fp32-") as tmp:
        files: dict[str, Path] = {}
        for name, groups in VARIANTS.items():
            out = Path(tmp) / name.replace(" ", "-")
            report = export_model(args.model, out, ExportSettings(task="text-classification", keep_fp32=groups))
            if not files:
                files["fp32 (O2)"] = out / "model_optimized.onnx"
                rows["fp32 (O2)"] = {"kept_fp32_nodes": None}
            files[name] = out / QUANTIZED_FILE
            rows[name] = {"kept_fp32_nodes": len(report["quantization"]["kept_fp32"]["nodes"]), "order": report["quantization"]["order"],
                          "int8_vs_fp32": report["parity"]["int8_vs_fp32"]}
            console.print(f"exported {name} ({report['elapsed_s']:.0f} s)")
        for name, path in files.items():
            result = evaluate_onnx(path, task, dev, args.model)
            rows[name]["metrics"] = result.metrics[task.primary_split]
            console.print(f"scored {name}: {result.metrics}")
        p50 = interleaved_p50(files, args.rounds, args.repeats, seq=128)
        for name, ms in p50.items():
            rows[name]["p50_ms_b1_s128"] = ms
            rows[name]["size_mb"] = files[name].stat().st_size / 2**20

    primary = task.metrics[0]
    reference = rows["fp32 (O2)"]["metrics"][primary]
    table = Table(title=f"{args.task} dev: int8 variants of {args.model}")
    for column in ("file", primary, f"Δ {primary} vs fp32", "p50 ms (b1/s128)", "MB", "fp32 MatMuls kept"):
        table.add_column(column, justify="left" if column == "file" else "right")
    for name, row in rows.items():
        value = row["metrics"][primary]
        table.add_row(name, f"{100 * value:.2f}", "-" if name.startswith("fp32") else f"{100 * (value - reference):+.2f}",
                      f"{row['p50_ms_b1_s128']:.2f}", f"{row['size_mb']:.1f}", "all" if row["kept_fp32_nodes"] is None else str(row["kept_fp32_nodes"]))
    console.print(table)
    atomic_write_json(args.out, {"kind": "homoexport.int8_keep_fp32", "model": str(args.model), "task": args.task, "rows": rows,
                                 "rounds": args.rounds, "repeats": args.repeats, "machine": fingerprint(),
                                 "command": "python benchmarks/int8_keep_fp32.py " + " ".join(argv if argv is not None else sys.argv[1:])})
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
