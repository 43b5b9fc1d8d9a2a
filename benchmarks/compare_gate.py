"""Does `homoexport bench --compare` gate reliably on a busy machine?

A baseline int8 file (random weights, --base shape of the teacher) and a "regressed" file of the same
teacher with one more encoder layer or a wider FFN, chosen so that it is --slowdown (15%) slower than the
baseline when timed side by side on the quiet machine (the candidates' ratios are measured first and the
closest is kept; its measured ratio is reported). A layer is about a sixth of a 5-layer student's time; FFN
widths alone gave non-monotone ratios of 0.94-1.065 here. Then, while a second process keeps one core busy, `homoexport bench` runs --trials times
for each: the baseline against its own stored JSON (must pass the --gate, 5%) and the regressed file under the
baseline's name (must fail it). The bench files name the baseline's model file, so the gate times both files
interleaved in one process and gates on their ratio.

    python benchmarks/compare_gate.py --teacher ../shared/models/all-MiniLM-L6-v2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from load import one_core_busy

from homoexport.atomic import atomic_write_json
from homoexport.deployment.bench import BenchSettings, interleaved_ratios
from homoexport.deployment.budget import CandidateExporter, PlanSettings, Shape
from homoexport.machine import fingerprint


def bench(model: Path, name: str, out: Path, args: argparse.Namespace, baseline: Path | None = None) -> tuple[int, dict]:
    """One `homoexport bench` invocation in its own process; its exit code and JSON."""
    cmd = [sys.executable, "-m", "homoexport", "bench", f"{name}={model}", "--threads", str(args.threads), "--repeats", str(args.repeats),
           "--out", str(out), "--max-regression", f"{args.gate:g}"]
    if baseline is not None:
        cmd += ["--compare", str(baseline)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"homoexport bench exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return proc.returncode, json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, type=Path)
    ap.add_argument("--base", default="192:6:768:5", help="baseline shape HIDDEN:HEADS:FFN:LAYERS")
    ap.add_argument("--slowdown", type=float, default=0.15, help="how much slower the regressed file should be")
    ap.add_argument("--gate", type=float, default=0.05, help="--max-regression of the gate")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/compare_gate.json"))
    args = ap.parse_args()

    hidden, heads, ffn, layers = (int(x) for x in args.base.split(":"))
    settings = PlanSettings(threads=args.threads)
    exporter = CandidateExporter(args.teacher, settings)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="compare-gate-") as tmp:
        work = Path(tmp)
        base = exporter.export(Shape(hidden, heads, ffn, layers), work / "base")
        # Regressed candidates: one more layer, or a wider FFN; keep the one closest to the wanted slowdown.
        candidates = {f"layers{layers + 1}": Shape(hidden, heads, ffn, layers + 1)}
        candidates |= {f"ffn{ffn + extra}": Shape(hidden, heads, ffn + extra, layers) for extra in (128, 256, 384, 512)}
        quiet = BenchSettings(batches=(1,), seqs=(128,), threads=(args.threads,), repeats=100)
        ratios, files = {}, {}
        for name, shape in candidates.items():
            files[name] = exporter.export(shape, work / name)
            ratios[name] = next(iter(interleaved_ratios({"m": (files[name], base)}, quiet).values()))
            print(f"{name}: {ratios[name]:.3f}x the baseline (quiet, side by side)", flush=True)
        slow_name = min(ratios, key=lambda n: abs(ratios[n] - 1 - args.slowdown))
        slow = files[slow_name]

        _, base_report = bench(base, "model", work / "baseline.json", args)
        results: dict[str, list[dict]] = {"self": [], "regressed": []}
        with one_core_busy():
            for trial in range(args.trials):
                for kind, model in (("self", base), ("regressed", slow)):
                    code, report = bench(model, "model", work / f"{kind}-{trial}.json", args, baseline=work / "baseline.json")
                    diff = next(d for d in report["comparison"]["diffs"] if d["kind"] == "latency")
                    results[kind].append({"exit": code, "ratio": diff["change"] + 1 if diff["change"] is not None else None,
                                          "mode": report["comparison"]["mode"]})
                    print(f"trial {trial + 1} {kind}: exit {code}, ratio {results[kind][-1]['ratio']:.3f} ({results[kind][-1]['mode']})", flush=True)

    passes = sum(r["exit"] == 0 for r in results["self"])
    fails = sum(r["exit"] == 1 for r in results["regressed"])
    ok = passes == args.trials and fails == args.trials
    print(f"\nbaseline {args.base}, regressed {slow_name}: quiet side-by-side ratio {ratios[slow_name]:.3f}; gate {args.gate:.0%}; "
          f"{args.threads} threads; one core busy during the trials")
    print("\n| compare | trials | gate result as wanted | ratios (min-max) |\n|---|---:|---:|---|")
    for kind, wanted in (("self", passes), ("regressed", fails)):
        r = [x["ratio"] for x in results[kind]]
        print(f"| {kind} | {args.trials} | {wanted} | {min(r):.3f}-{max(r):.3f} |")
    print(f"\n{'PASS' if ok else 'FAIL'}")
    atomic_write_json(args.out, {"schema": "homoexport.benchmark.compare_gate/1", "machine": fingerprint(), "base": args.base,
                                 "regressed": slow_name, "regressed_quiet_ratio": ratios[slow_name], "candidate_ratios": ratios, "gate": args.gate,
                                 "threads": args.threads, "repeats": args.repeats, "load": "one core spinning (python busy loop)",
                                 "baseline_p50_ms": base_report["results"][0]["p50_ms"], "results": results, "self_passes": passes,
                                 "regressed_fails": fails, "pass": ok, "wall_s": round(time.time() - started, 1)})
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
