"""Does the calibration probe see what slows an encoder down?

The planner, `bench` and `bench --compare` judge every latency figure by a calibration probe timed beside it.
A probe is useful only if it (1) reads the same on a quiet machine, run after run, and (2) slows down
whenever an int8 encoder does. This times, under four conditions in a row (quiet, one core spinning in
Python, one core streaming memory, quiet again):

- the single 256x1024x1024 fp32 MatMul that was the probe up to homoexport 0.1.0 (rebuilt here to compare),
- the current probe (`bench.calibration_probe`: eight MatMul/Relu/MatMul/Add/LayerNorm blocks),
- random-weight int8 students of the teacher at hidden 192 and 384 (exported as the planner does),

each probe `--readings` times (median of 30 calls each), each encoder as the median of three rounds of
`--repeats` calls on one session.

    python benchmarks/probe_fidelity.py --teacher ../shared/models/all-MiniLM-L6-v2 --out benchmarks/results/probe_fidelity.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from load import memory_streaming, one_core_busy

from homoexport.atomic import atomic_write_json
from homoexport.deployment.bench import PROBE_WORKLOAD, calibration_probe, load_session, measure_latency, median_call_ms, session_options
from homoexport.deployment.budget import CandidateExporter, PlanSettings, Shape
from homoexport.machine import fingerprint

CONDITIONS = (("quiet", nullcontext), ("one core spinning", one_core_busy), ("one core streaming memory", memory_streaming),
              ("quiet again", nullcontext))
SHAPES = (Shape(192, 6, 768, 6), Shape(384, 12, 1536, 6))


def matmul_probe(threads: int):
    """The former probe: one 256 x 1024 x 1024 fp32 MatMul; returns a function timing it like calibration_probe."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((1024, 1024)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256, 1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256, 1024])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), sess_options=session_options(threads), providers=["CPUExecutionProvider"])
    x = {"x": rng.standard_normal((256, 1024)).astype(np.float32)}
    return lambda: median_call_ms(session, x, repeats=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--readings", type=int, default=5, help="probe readings per condition")
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per encoder round")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/probe_fidelity.json"))
    args = ap.parse_args()

    settings = PlanSettings(batch=1, seq=128, threads=args.threads, precision="int8")
    old_probe = matmul_probe(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="probe-fidelity-") as tmp:
        exporter = CandidateExporter(args.teacher, settings)
        files = {s.name: exporter.export(s, Path(tmp) / s.name) for s in SHAPES}
        sessions = {name: load_session(path, args.threads) for name, path in files.items()}
        for condition, load in CONDITIONS:
            with load():
                time.sleep(2.0)  # let the load reach its steady state
                row = {"condition": condition,
                       "matmul_probe_ms": [old_probe() for _ in range(args.readings)],
                       "probe_ms": [calibration_probe(args.threads) for _ in range(args.readings)],
                       "encoders_ms": {name: float(np.median([measure_latency(files[name], threads=args.threads, warmup=5, repeats=args.repeats,
                                                                               session=session).p50_ms for _ in range(3)]))
                                       for name, session in sessions.items()}}
            rows.append(row)
            print(condition, {k: [round(v, 2) for v in row[k]] for k in ("matmul_probe_ms", "probe_ms")},
                  {k: round(v, 2) for k, v in row["encoders_ms"].items()}, flush=True)

    quiet = rows[0]
    base = {"matmul_probe_ms": statistics.median(quiet["matmul_probe_ms"]), "probe_ms": statistics.median(quiet["probe_ms"]),
            **quiet["encoders_ms"]}
    for row in rows:
        row["slowdown"] = {"matmul_probe": statistics.median(row["matmul_probe_ms"]) / base["matmul_probe_ms"],
                           "probe": statistics.median(row["probe_ms"]) / base["probe_ms"],
                           **{name: ms / base[name] for name, ms in row["encoders_ms"].items()}}
        row["spread"] = {k: max(row[k]) / min(row[k]) - 1 for k in ("matmul_probe_ms", "probe_ms")}
    names = [s.name for s in SHAPES]
    print("\n| condition | MatMul probe: slowdown (spread of readings) | current probe: slowdown (spread) | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for row in rows:
        sd, sp = row["slowdown"], row["spread"]
        print(f"| {row['condition']} | {sd['matmul_probe']:.2f}x ({sp['matmul_probe_ms']:.0%}) | {sd['probe']:.2f}x ({sp['probe_ms']:.0%}) | "
              + " | ".join(f"{sd[n]:.2f}x" for n in names) + " |")
    atomic_write_json(args.out, {"schema": "homoexport.benchmark.probe_fidelity/1", "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                 "settings": {"threads": args.threads, "readings": args.readings, "repeats": args.repeats, "batch": 1, "seq": 128,
                                              "precision": "int8", "probe_workload": PROBE_WORKLOAD},
                                 "machine": fingerprint(), "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
