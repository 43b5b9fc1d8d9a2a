"""Task-specific HomoDistil against its baselines, deployed as int8 ONNX, on GLUE dev sets.

For each task the teacher is all-MiniLM-L6-v2 fine-tuned on the task (``run_glue``: full training set,
lr 1e-4, best dev checkpoint). Students, all from that teacher, with the same data and epochs:

    (a)  homodistil   task HomoDistil: copy the fine-tuned teacher, prune iteratively while distilling
    (b)  oneshot      copy, prune to the target at step 0 (importance on a few batches), then distill
    (c)  prune_ft     one-shot prune of the fine-tuned classifier (head kept), then plain fine-tuning
                      at the learning rate of ``PRUNE_FT_LRS`` that scores best on dev
    (d)  agnostic     the task-agnostic quickstart student (recipes/quickstart.yaml) fine-tuned on the task
    (a128)            (a) at hidden 128 / 4 heads / FFN 512
    (ax)              (a) with half its labelled passes traded for other GLUE tasks' text, labelled by the teacher
                      alone (``task.unlabelled``, ``UNLABELLED_TEXT``): as many rows as the training set, half
                      the epochs, so the same steps as (a)
    (aa)              (a) with ``AUGMENT_COPIES`` word-swapped copies of each training row, labelled by the teacher alone
                      (``task.augment``, TinyBERT's augmentation), epochs divided by 1 + copies: the same steps as (a)
    (af)              (a) with ``pruning.t_f`` ``FAST_T_F``: the final width is reached after 30% of the steps instead of
                      60%, so the cheaper dense student trains longer
    (ab)              (a) with ``training.precision: bf16`` (forward passes and losses under bf16 autocast; the arms
                      above pin fp32, the precision their figures were measured at)
    (abh)             (ab) with ``task.hard_label`` ``HARD_LABEL``: the student also learns the gold labels the teacher misses
    (a0)              (ab) without pruning: the teacher's own copy distilled for the same epochs, the control that
                      separates what pruning loses from what continued training on the task loses
    (afam)            (a) keeping a dense student at each of ``FAMILY``'s hidden sizes on the way down (``task.family``); the
                      run exports every student to int8 ONNX, scores it on dev and times them side by side: the
                      width-vs-score-vs-latency curve of one run (its final student is (a)'s, the same seed and steps)
    (al)              (ab) with ``LONG`` times the epochs (and so the pruning phase ``LONG`` times as many steps; CoFi trains
                      its small GLUE tasks for 100 epochs of pruning and 20 of fine-tuning, (a) for 10 in all) and
                      ``task.keep_best``: the best dev student at the final width ships, as the teacher's best dev
                      checkpoint does (the last step's dev scores stay in the row, ``keep_best``)
    (ak)              (ab) with the logits term alone (``losses`` hidden, attention and embedding 0): what the fine-tuned
                      teacher's hidden states and attention maps add over its predictions on the task's data
    (abs)             (ab) at ``SLOW_LR`` instead of ``DISTILL_LR``: on RTE even the unpruned control (a0) drifts below the
                      teacher at 1e-4, so does a smaller step keep the student nearer the teacher's solution while it is pruned?
    (alx)             (al) with the teacher also labelling other text, up to ``MUCH_TEXT`` times the training rows
                      (``MUCH_TEXT_SOURCES`` and the task's GLUE test inputs), over (al)'s steps: the RTE and CoLA teachers
                      fit their training rows (``teacher_fit.py``), so their predictions there are mostly the labels again
    (axt)             (ab) with the task's own GLUE test inputs (whose labels were never published) as unlabelled
                      in-domain text for the teacher to label (``task.unlabelled: [glue:TASK/test]``; runs before this
                      read the same rows from a JSON-lines file and cannot be resumed by this code), the same epochs over
                      both: about (a)'s wall time on RTE

(a), (b), (a128) and the variants of (a) (``VARIANTS``) are ``homoexport distill`` task recipes (``task_recipe``); every student is exported
(O2 fusion + dynamic int8) and scored in PyTorch, ONNX fp32 and ONNX int8 by ``run_glue`` (``--no-train``
for the distilled ones). Every unit (teacher, distillation, scoring) lands atomically under ``--work`` and
is skipped when there, and distillations resume from their checkpoints: rerun the same command after a
kill. Results: ``--results``/task_distill.{json,md}, rebuilt from whatever has finished.

    python benchmarks/task_distill.py --tasks mrpc,rte,cola,sst2 --arms a,b,c
    python benchmarks/task_distill.py --tasks mrpc --arms a --seeds 1,2,3
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from homoexport.atomic import atomic_write_json, atomic_write_text
from homoexport.evaluation.glue import TASK_TITLES, GlueSettings, run_glue
from homoexport.machine import fingerprint

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"192": {"hidden": 192, "heads": 6, "ffn": 768}, "128": {"hidden": 128, "heads": 4, "ffn": 512},
          "384": {"hidden": 384, "heads": 12, "ffn": 1536}}
ARMS = {
    "a": ("homodistil", "task HomoDistil (iterative)", "192"),
    "b": ("oneshot", "one-shot prune + task distillation", "192"),
    "c": ("prune_ft", "one-shot prune + fine-tuning (best lr)", "192"),
    "d": ("agnostic", "task-agnostic quickstart student + fine-tuning", "192"),
    "a128": ("homodistil", "task HomoDistil (iterative)", "128"),
    "ax": ("homodistil", "task HomoDistil + unlabelled text for the teacher", "192"),
    "aa": ("homodistil", "task HomoDistil + word-swapped copies for the teacher", "192"),
    "af": ("homodistil", "task HomoDistil, final width reached at 30% of the steps", "192"),
    "ab": ("homodistil", "task HomoDistil in bf16 autocast", "192"),
    "abh": ("homodistil", "task HomoDistil in bf16 + the gold labels' term", "192"),
    "axt": ("homodistil", "task HomoDistil in bf16 + the task's unlabelled test text for the teacher", "192"),
    "a0": ("distill", "task distillation in bf16 without pruning (control)", "384"),
    "afam": ("homodistil", "task HomoDistil (iterative), keeping a family of students", "192"),
    "al": ("homodistil", "task HomoDistil in bf16, three times the epochs, best dev student", "192"),
    "ak": ("homodistil", "task HomoDistil in bf16, the logits term alone", "192"),
    "abs": ("homodistil", "task HomoDistil in bf16 at a third of the learning rate", "192"),
    "alx": ("homodistil", "task HomoDistil as (al) + other text for the teacher (up to 8x the rows), same steps", "192"),
}
SCHEDULES = {"b": "one_shot", "a0": "none"}  # every other distilled arm prunes gradually ("homotopic")
T_F = 0.4  # (a): the share of the steps spent at the final width
FAST_T_F = 0.7
AUGMENT_COPIES = 4
HARD_LABEL = 1.0
FAMILY = [320, 288, 256, 224]  # (afam): hidden sizes kept on the way to 192
LONG = 3  # (al): times (a)'s epochs
SLOW_LR = 3e-5  # (abs): TinyBERT's task-distillation learning rate, a third of DISTILL_LR
# The arms that change one thing of (a)'s recipe: task_recipe's keyword arguments.
VARIANTS: dict[str, dict[str, Any]] = {
    "ax": {"unlabelled": True}, "aa": {"augment": True}, "af": {"t_f": FAST_T_F}, "ab": {"precision": "bf16"},
    "abh": {"precision": "bf16", "hard_label": HARD_LABEL},
    "axt": {"precision": "bf16", "test_text": True}, "a0": {"precision": "bf16"}, "afam": {"family": FAMILY},
    "al": {"precision": "bf16", "epochs_scale": LONG, "keep_best": True},
    "ak": {"precision": "bf16", "logits_only": True},
    "abs": {"precision": "bf16", "lr": SLOW_LR},
    "alx": {"precision": "bf16", "epochs_scale": LONG, "keep_best": True, "much_text": True},
}
DISTILLED_ARMS = ("a", "b", "a128", *VARIANTS)
# Text the teacher labels for (ax): other GLUE tasks' training splits (pairs for pair tasks), never a dev or test file.
UNLABELLED_TEXT = {"rte": ["glue:mrpc", "glue:stsb"], "mrpc": ["glue:rte", "glue:stsb"], "cola": ["glue:stsb", "glue:sst2"],
                   "sst2": ["glue:stsb", "glue:cola"]}
# Text the teacher labels for (alx) beside the task's GLUE test inputs: other tasks' training splits and QNLI's dev
# questions and answers (a different task's file; only its text is read), up to MUCH_TEXT times the training rows.
MUCH_TEXT_SOURCES = {"rte": ["glue:mrpc", "glue:stsb", "glue:qnli/dev"], "mrpc": ["glue:rte", "glue:stsb", "glue:qnli/dev"],
                     "cola": ["glue:sst2", "glue:stsb"], "sst2": ["glue:cola", "glue:stsb"]}
MUCH_TEXT = 8
# Epochs of the teacher's fine-tuning and of every student's training, per task.
TEACHER_EPOCHS = {"mrpc": 5, "rte": 5, "cola": 5, "sst2": 2, "stsb": 5, "qnli": 2}
STUDENT_EPOCHS = {"mrpc": 10, "rte": 10, "cola": 10, "sst2": 2, "stsb": 10, "qnli": 2}
TEACHER_LR = 1e-4
DISTILL_LR = 1e-4
BATCH_SIZE = 32
PRUNE_FT_LRS = (5e-5, 2e-4)


def teacher_dir(work: Path, task: str) -> Path:
    return work / f"teacher-{task}" / "seed-42" / "model"


def ensure_teacher(work: Path, task: str, encoder: Path, glue_data: Path) -> dict[str, Any]:
    out = work / f"teacher-{task}"
    if not (out / "glue_report.json").is_file():
        settings = GlueSettings(epochs=TEACHER_EPOCHS[task], learning_rate=TEACHER_LR, seeds=(42,), export=False)
        run_glue(encoder, task, out, settings, data_dir=glue_data)
    return json.loads((out / "glue_report.json").read_text())


def task_recipe(task: str, teacher: Path, glue_data: Path, shape: str, seed: int, schedule: str, out: Path,
                unlabelled: bool = False, augment: bool = False, t_f: float = T_F, precision: str = "fp32", hard_label: float = 0.0,
                test_text: bool = False, family: Sequence[int] = (), epochs_scale: int = 1, keep_best: bool = False,
                logits_only: bool = False, lr: float | None = None, much_text: bool = False) -> dict[str, Any]:
    """The recipe of arms (a), (b), (a128) and ``VARIANTS``: KL at T=2 on the logits plus hidden/attention/embedding terms."""
    eval_every = None
    spec: dict[str, Any] = {"glue": task, "data_dir": str(glue_data), "epochs": STUDENT_EPOCHS[task] * epochs_scale, "max_length": 128,
                            "export": False}
    if hard_label:
        spec["hard_label"] = hard_label
    if keep_best:
        spec["keep_best"] = True
    if family:
        spec |= {"family": list(family), "export": True}
    if unlabelled:
        from homoexport.evaluation.glue_data import get_task, read_tsv

        rows = len(read_tsv(get_task(task), glue_data / get_task(task).directory / "train.tsv"))
        spec |= {"unlabelled": UNLABELLED_TEXT[task], "max_unlabelled_samples": rows, "epochs": STUDENT_EPOCHS[task] / 2}
    if test_text:
        spec |= {"unlabelled": [f"glue:{task}/test"]}
    if much_text:
        from homoexport.distillation.task_data import load_glue, unlabelled_rows

        data = load_glue(task, glue_data)
        sources = [*MUCH_TEXT_SOURCES[task], f"glue:{task}/test"]
        extra = len(unlabelled_rows(sources, data, glue_data, "sentence", None, MUCH_TEXT * len(data.train), seed))
        spec |= {"unlabelled": sources, "max_unlabelled_samples": MUCH_TEXT * len(data.train),
                 "epochs": spec["epochs"] * len(data.train) / (len(data.train) + extra)}  # (al)'s steps over the larger set
        eval_every = math.ceil(len(data.train) / BATCH_SIZE)  # as often as (al) evaluates: once per pass over the labelled rows
    if augment:
        spec |= {"augment": {"copies": AUGMENT_COPIES}, "epochs": STUDENT_EPOCHS[task] / (1 + AUGMENT_COPIES)}
    return {
        "name": f"{task}-{schedule}-{shape}{'-unlabelled' if unlabelled else ''}{'-augmented' if augment else ''}-s{seed}"
                + ("-fast" if t_f != T_F else "") + ("-bf16" if precision == "bf16" else "") + ("-gold" if hard_label else "") + ("-testtext" if test_text else "") + ("-family" if family else "") + (f"-epochs{epochs_scale}x" if epochs_scale != 1 else "") + ("-best" if keep_best else "") + ("-logits" if logits_only else "") + (f"-lr{lr:g}" if lr else "") + ("-muchtext" if much_text else ""),
        "teacher": str(teacher),
        "student": SHAPES[shape],
        "task": spec,
        "losses": {"kl": 1.0, "temperature": 2.0, **dict.fromkeys(("hidden", "attention", "embedding"), 0.0 if logits_only else 1.0)},
        "pruning": {"schedule": schedule, "importance": "platon", "t_i": 0, "t_f": t_f, "interval": 10, "multiple": 16},
        "optimizer": {"lr": lr or DISTILL_LR, "warmup": 0.05},
        "training": {"batch_size": BATCH_SIZE, "seed": seed, "log_every": 20, "checkpoint_every": 100, "precision": precision,
                     **({"eval_every": eval_every} if eval_every else {})},
        "output": str(out),
    }


def distill_student(task: str, arm: str, seed: int, work: Path, glue_data: Path, precision: str | None = None) -> Path:
    from homoexport.config.recipe import validate_recipe
    from homoexport.distillation.task import distill_task

    run = work / task / f"{arm}-s{seed}"
    if (run / "report.json").is_file():
        trained = json.loads((run / "report.json").read_text()).get("precision")
        if precision and trained and trained != precision:
            raise SystemExit(f"{run} finished in {trained}, not the --precision {precision} asked for: move it away to train it "
                             f"again, or pass --precision {trained}")
    else:
        schedule = SCHEDULES.get(arm, "homotopic")
        variant = VARIANTS.get(arm, {}) | ({"precision": precision} if precision else {})
        recipe = validate_recipe(task_recipe(task, teacher_dir(work, task), glue_data, ARMS[arm][2], seed, schedule, run / "distill", **variant))
        report = distill_task(recipe, resume=(run / "distill").exists())
        atomic_write_json(run / "report.json", report)
    return run / "distill" / "student"


def pruned_classifier(task: str, work: Path, glue_data: Path) -> Path:
    """The fine-tuned teacher pruned once to 192/6/768 (head kept), importance scored on its task's sentences."""
    from homoexport.pruning.oneshot import prune_model

    out = work / task / "pruned-192"
    if not (out / "prune_report.json").is_file():
        text = work / task / "train_sentences.txt"
        if not text.is_file():
            from homoexport.evaluation.glue_data import get_task, read_tsv

            spec = get_task(task)
            rows = read_tsv(spec, glue_data / spec.directory / "train.tsv")
            lines = [" ".join(r[c] for c in ("text_a", "text_b") if c in r) for r in rows.select(range(min(2000, len(rows))))]
            atomic_write_text(text, "\n".join(lines) + "\n")
        prune_model(teacher_dir(work, task), out, **SHAPES["192"], data=[str(text)], batches=16, batch_size=16, overwrite=False)
    return out


def quickstart_student(work: Path) -> Path:
    from homoexport.config.recipe import load_recipe
    from homoexport.distillation.trainer import distill

    out = work / "quickstart"
    if not (out / "report.json").is_file():
        distill(load_recipe(REPO / "recipes" / "quickstart.yaml"), out_dir=out, resume=out.exists())
    return out / "student"


def score(task: str, model: Path, out: Path, glue_data: Path, settings: GlueSettings) -> dict[str, Any]:
    """``run_glue`` once into ``out`` (skipped when its report is there): fine-tune or score ``model`` as ``settings`` say."""
    if not (out / "glue_report.json").is_file():
        run_glue(model, task, out, settings, data_dir=glue_data, overwrite=out.exists())
    return json.loads((out / "glue_report.json").read_text())


def primary(report: dict[str, Any], backend: str) -> float | None:
    row = next(r for r in report["results"] if r["primary"])
    return row[backend]


def task_score(report: dict[str, Any], backend: str) -> float | None:
    """GLUE's score of a task: the mean of its metrics on the main dev split (MRPC: F1 and accuracy; CoLA: MCC)."""
    split = next(r for r in report["results"] if r["primary"])["split"]
    values = [r[backend] for r in report["results"] if r["split"] == split]
    return None if any(v is None for v in values) else sum(values) / len(values)


def metric_values(report: dict[str, Any], backend: str) -> dict[str, float | None]:
    split = next(r for r in report["results"] if r["primary"])["split"]
    return {r["metric"]: r[backend] for r in report["results"] if r["split"] == split}


def _export_report(glue_dir: Path) -> dict[str, Any] | None:
    found = sorted(glue_dir.glob("seed-*/onnx/export_report.json"))
    return json.loads(found[0].read_text()) if found else None


def export_latency_ms(glue_dir: Path, file: str = "model_quantized.onnx") -> float | None:
    """p50 ms at batch 1 / seq 128 of one exported file, from the export's own latency check."""
    report = _export_report(glue_dir)
    return None if report is None else report["latency_ms"]["by_file"].get(file, {}).get("p50_ms")


def int8_gate(glue_dir: Path) -> dict[str, Any] | None:
    """How closely the int8 file agreed with fp32 at export, and on which inputs (built-in texts or the dev inputs)."""
    report = _export_report(glue_dir)
    if report is None or "int8_vs_fp32" not in report["parity"]:
        return None
    inputs = report.get("validation_inputs", {})
    return {"agreement": report["parity"]["int8_vs_fp32"].get("agreement"), "texts": inputs.get("texts"),
            "source": inputs.get("source", "built-in")}  # reports from before the source was recorded used the built-in texts


def keep_fp32_dir(run: Path, groups: Sequence[str]) -> Path:
    """Where a distilled student is scored again with ``groups`` left fp32 in its int8 file (outside ``glue*``, whose
    reports are the row's own scores)."""
    return run / f"int8-keep-{'-'.join(groups)}"


def run_arm(task: str, arm: str, seed: int, work: Path, glue_data: Path, keep_fp32: tuple[str, ...] = (), precision: str | None = None) -> None:
    run = work / task / f"{arm}-s{seed}"
    started = time.time()
    if arm in DISTILLED_ARMS:
        student = distill_student(task, arm, seed, work, glue_data, precision)
        score(task, student, run / "glue", glue_data, GlueSettings(train=False))
        if keep_fp32:
            score(task, student, keep_fp32_dir(run, keep_fp32), glue_data, GlueSettings(train=False, keep_fp32=keep_fp32))
    elif arm == "c":
        pruned = pruned_classifier(task, work, glue_data)
        for lr in PRUNE_FT_LRS:
            score(task, pruned, run / f"glue-lr{lr:g}", glue_data, GlueSettings(epochs=STUDENT_EPOCHS[task], learning_rate=lr, seeds=(seed,)))
    elif arm == "d":
        score(task, quickstart_student(work), run / "glue", glue_data, GlueSettings(epochs=STUDENT_EPOCHS[task], learning_rate=2e-4, seeds=(seed,)))
    marker = run / "wall.json"
    if not marker.is_file():
        atomic_write_json(marker, {"wall_s_this_invocation": time.time() - started})


def _glue_dirs(run: Path) -> list[Path]:
    return sorted(p.parent for p in run.glob("glue*/glue_report.json"))


def collect(work: Path, tasks: Sequence[str], arms: Sequence[str], earlier: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Every finished (task, arm, seed) as a row; for (c) the learning rate with the best PyTorch dev score.

    ``earlier`` rows (from the committed results) are kept where ``work`` no longer holds that run, so a fresh
    work directory adds to the table instead of erasing it.
    """
    rows: list[dict[str, Any]] = []
    for task in tasks:
        teacher = work / f"teacher-{task}" / "glue_report.json"
        if teacher.is_file():
            t = json.loads(teacher.read_text())
            rows.append({"task": task, "arm": "teacher", "seed": 42, "cpu": (t.get("machine") or {}).get("cpu_model"), "pytorch": task_score(t, "pytorch"), "onnx_int8": None, "onnx_fp32": None,
                         "metrics": {"pytorch": metric_values(t, "pytorch")}, "train_s": t["runs"][0]["wall_s"]["train_s"]})
        for arm in arms:
            for run in sorted((work / task).glob(f"{arm}-s*")):
                if not _glue_dirs(run):
                    continue
                pairs = [(d, json.loads((d / "glue_report.json").read_text())) for d in _glue_dirs(run)]
                best_dir, best = max(pairs, key=lambda p: primary(p[1], "pytorch"))  # (c): the lr chosen on dev
                distill = json.loads((run / "report.json").read_text()) if (run / "report.json").is_file() else None
                rows.append({
                    "task": task, "arm": arm, "seed": int(run.name.rsplit("-s", 1)[1]),
                    **{b: task_score(best, b) for b in ("pytorch", "onnx_fp32", "onnx_int8")},
                    "metrics": {b: metric_values(best, b) for b in ("pytorch", "onnx_fp32", "onnx_int8")},
                    "lr": best["settings"]["learning_rate"] if best["settings"].get("train", True) else None,
                    "every_lr": {str(r["settings"]["learning_rate"]): {b: metric_values(r, b) for b in ("pytorch", "onnx_int8")}
                                 for _, r in pairs} if len(pairs) > 1 else None,
                    "distill_s": distill["wall_time_s"] if distill else None,
                    "resumed_from_step": distill.get("resumed_from_step") if distill else None,
                    # distill_s counts the steps after this one (a resume from a checkpoint that did not carry the time; reports
                    # from before wall_time_from_step counted every resumed run that way)
                    "wall_time_from_step": distill.get("wall_time_from_step", distill.get("resumed_from_step")) if distill else None,
                    "train_s": best["runs"][0]["wall_s"].get("train_s"),
                    "int8_p50_ms_b1_s128": export_latency_ms(best_dir),
                    "fp32_p50_ms_b1_s128": export_latency_ms(best_dir, "model.onnx"),
                    "int8_gate": int8_gate(best_dir),
                    "dev_curve": distill["curve"] if distill else None,  # (step, widths, dev metrics) during distillation
                    "load_average_1m": best.get("load_average_1m"),
                    "cpu": (best.get("machine") or {}).get("cpu_model"),  # rows of one table were run on different machines
                    "widths": distill["student"]["widths"] if distill else None,
                    "data": distill["data"] if distill else None,  # rows trained on: labelled, unlabelled, word-swapped, dev
                    **step_times(run / "distill" / "train_log.jsonl"),
                    "family": family_curve(distill),
                    "keep_best": distill.get("keep_best") if distill else None,  # the step that shipped; the last step's dev scores
                    "precision": distill.get("precision") if distill else None,
                    "int8_keep_fp32": kept_fp32_scores(run),
                })
    have = {(r["task"], r["arm"], r["seed"]) for r in rows}
    rows += [r for r in earlier if (r["task"], r["arm"], r["seed"]) not in have and r["task"] in tasks]
    for r in rows:
        r["final_width_best"] = final_width_best(r)
    order = list(TEACHER_EPOCHS)
    rows.sort(key=lambda r: (order.index(r["task"]) if r["task"] in order else 99, ["teacher", *ARMS].index(r["arm"]), r["seed"]))
    return {"schema": "homoexport.benchmark.task_distill/1", "rows": rows, "summary": summarize(rows, tasks, arms),
            "settings": {"teacher_epochs": TEACHER_EPOCHS, "student_epochs": STUDENT_EPOCHS, "teacher_lr": TEACHER_LR,
                         "distill_lr": DISTILL_LR, "prune_ft_lrs": PRUNE_FT_LRS, "shapes": SHAPES, "unlabelled_text": UNLABELLED_TEXT,
                         "augment_copies": AUGMENT_COPIES, "t_f": {"a": T_F, "af": FAST_T_F},
                         "variants": VARIANTS},
            "machine": fingerprint()}


def kept_fp32_scores(run: Path) -> dict[str, Any] | None:
    """The student's int8 scores with layer groups left fp32 (``--int8-keep-fp32``), by group list, beside its p50 ms."""
    out = {}
    for d in sorted(run.glob("int8-keep-*")):
        if (d / "glue_report.json").is_file():
            report = json.loads((d / "glue_report.json").read_text())
            out[d.name.removeprefix("int8-keep-")] = {"onnx_int8": task_score(report, "onnx_int8"), "metrics": metric_values(report, "onnx_int8"),
                                                      "int8_p50_ms_b1_s128": export_latency_ms(d)}
    return out or None


def final_width_best(row: dict[str, Any]) -> dict[str, Any] | None:
    """What ``task.keep_best`` ships, read off a run's dev curve (PyTorch): the first evaluation at the final width with
    the best primary metric, beside the last one, as GLUE scores (the mean of the task's metrics)."""
    from homoexport.evaluation.glue_data import get_task

    curve = row.get("dev_curve")
    if not curve:
        return None
    primary_metric = get_task(row["task"]).primary_metric
    final = [c for c in curve if c["widths"] == curve[-1]["widths"]]
    best = max(final, key=lambda c: c["dev"][primary_metric])
    return {"step": best["step"], "pytorch": statistics.mean(best["dev"].values()),
            "last_pytorch": statistics.mean(curve[-1]["dev"].values()), "evaluations": len(final)}


def family_curve(distill: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """(afam): each kept student's shape, size, dev score in PyTorch and as int8 ONNX, and int8 latency (side by side)."""
    if not distill or len(distill.get("family") or []) < 2:
        return None
    metric = distill["primary_metric"]
    return [{"widths": m["widths"], "parameters": m["parameters"], "step": m["step"], "metric": metric, "pytorch": m["dev"][metric],
             "onnx_int8": (m.get("int8") or {}).get("dev", {}).get(metric), "int8_p50_ms_b1": (m.get("int8") or {}).get("p50_ms"),
             "int8_mb": (m.get("int8") or {}).get("file_mb")} for m in distill["family"]]


def step_times(log: Path) -> dict[str, Any]:
    """When a distillation switched to the dense student, and the median logged step time before and after."""
    if not log.is_file():
        return {}
    records = [json.loads(line) for line in log.read_text().splitlines() if line]
    timed = [r for r in records if "dev" not in r and "step_s" in r]  # evaluation steps include the dev pass
    dense = [r["step_s"] for r in timed if r.get("dense")]
    masked = [r["step_s"] for r in timed if not r.get("dense")]
    return {"dense_from_step": next((r["step"] for r in records if r.get("dense")), None),
            "median_step_s": {"masked": statistics.median(masked) if masked else None, "dense": statistics.median(dense) if dense else None}}


def _mean_std(values: list[float]) -> tuple[float | None, float | None, int]:
    if not values:
        return None, None, 0
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def summarize(rows: list[dict[str, Any]], tasks: Sequence[str], arms: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for arm in ("teacher", *arms):
        backend = "pytorch" if arm == "teacher" else "onnx_int8"
        cells = {}
        for task in tasks:
            mean, std, n = _mean_std([r[backend] for r in rows if r["task"] == task and r["arm"] == arm and r[backend] is not None])
            torch_mean, _, _ = _mean_std([r["pytorch"] for r in rows if r["task"] == task and r["arm"] == arm and r["pytorch"] is not None])
            cells[task] = {"mean": mean, "std": std, "n": n, "pytorch": torch_mean}
        done = [c["mean"] for c in cells.values() if c["mean"] is not None]
        out.append({"arm": arm, "backend": backend, "tasks": cells, "average": statistics.mean(done) if len(done) == len(tasks) else None})
    return out


def markdown(result: dict[str, Any], tasks: Sequence[str]) -> str:
    title = {"teacher": "fine-tuned teacher (PyTorch)", **{k: f"({k}) {v[1]} {v[2]}" for k, v in ARMS.items()}}
    head = "| model | " + " | ".join(TASK_TITLES.get(t, t) for t in tasks) + " | average |"
    lines = [head, "|" + "---|" * (len(tasks) + 2)]
    for s in result["summary"]:
        cells = []
        for t in tasks:
            c = s["tasks"][t]
            if c["mean"] is None:
                cells.append("—")
            else:
                cells.append(f"{c['mean']:.1f}" + (f" ± {c['std']:.1f}" if c["std"] is not None else "") + (f" (n={c['n']})" if c["n"] > 1 else ""))
        avg = f"{s['average']:.1f}" if s["average"] is not None else "—"
        lines.append(f"| {title.get(s['arm'], s['arm'])} | " + " | ".join(cells) + f" | {avg} |")
    return ("GLUE dev scores in points (the mean of a task's metrics: MRPC F1 and accuracy, CoLA MCC, RTE and SST-2 accuracy); "
            "students as int8 ONNX (O2 + dynamic int8), the teacher in PyTorch; mean ± std over seeds where n > 1; — not run yet.\n\n"
            + "\n".join(lines) + "\n" + _other_precision(result) + _best_dev(result) + _kept_fp32(result) + _families(result) + _details(result))


def _other_precision(result: dict[str, Any]) -> str:
    """Runs trained at another precision than their arm's (``--precision``), named under the table they are averaged into."""
    odd = [r for r in result["rows"] if r.get("precision") and r["arm"] in DISTILLED_ARMS
           and r["precision"] != VARIANTS.get(r["arm"], {}).get("precision", "fp32")]
    if not odd:
        return ""
    runs = "; ".join(f"{r['task']} ({r['arm']}) seed {r['seed']} in {r['precision']} on {r.get('cpu') or 'an unknown CPU'}" for r in odd)
    return f"\nTrained at another precision than their arm's (`--precision`; a CPU without native bf16 emulates it many times slower): {runs}.\n"


def _best_dev(result: dict[str, Any]) -> str:
    """Per distilled arm and task, PyTorch dev scores: the last step's against the best evaluation at the final width
    (``task.keep_best``, read off the dev curves), mean over seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in result["rows"]:
        if r.get("final_width_best"):
            groups.setdefault((r["arm"], r["task"]), []).append(r["final_width_best"])
    if not groups:
        return ""
    out = ["", "PyTorch dev scores of the distilled arms: the last step against the best evaluation at the final width (what "
           "`task.keep_best` ships, read off each run's dev curve; (al) ran with it); mean over seeds.", "",
           "| arm | task | seeds | last step | best at final width | gain | evaluations at final width |", "|---|---|---|---|---|---|---|"]
    for (arm, task), runs in groups.items():
        last = statistics.mean(b["last_pytorch"] for b in runs)
        best = statistics.mean(b["pytorch"] for b in runs)
        out.append(f"| ({arm}) | {task} | {len(runs)} | {last:.2f} | {best:.2f} | {best - last:+.2f} | "
                   f"{'-'.join(sorted({str(b['evaluations']) for b in runs}))} |")
    return "\n".join(out) + "\n"


def _kept_fp32(result: dict[str, Any]) -> str:
    """Students scored again as int8 with layer groups left fp32: the int8 loss those groups carry."""
    rows = [r for r in result["rows"] if r.get("int8_keep_fp32")]
    if not rows:
        return ""
    out = ["", "Distilled students as int8 with layer groups left fp32 (`--int8-keep-fp32`, as `homoexport export --keep-fp32`): dev "
           "scores; their latency cost is in results/int8_keep_fp32.json (these exports were timed beside other runs).", "",
           "| task | arm | seed | PyTorch | int8 | int8, groups fp32 | change | groups |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for groups, k in r["int8_keep_fp32"].items():
            out.append(f"| {r['task']} | ({r['arm']}) | {r['seed']} | {r['pytorch']:.2f} | {r['onnx_int8']:.2f} | {k['onnx_int8']:.2f} | "
                       f"{k['onnx_int8'] - r['onnx_int8']:+.2f} | {groups} |")
    return "\n".join(out) + "\n"


def _families(result: dict[str, Any]) -> str:
    """(afam): one table per run, widest student first, against its teacher."""
    out = []
    for r in result["rows"]:
        if not r.get("family"):
            continue
        teacher = next((t for t in result["rows"] if t["task"] == r["task"] and t["arm"] == "teacher"), None)
        metric = r["family"][0]["metric"]
        t_score = teacher["metrics"]["pytorch"].get(metric) if teacher else None
        out += ["", f"{r['task']} seed {r['seed']}: the students of one run (dev {metric}; teacher {t_score:.2f} in PyTorch)" if t_score is not None
                else f"{r['task']} seed {r['seed']}: the students of one run (dev {metric})", "",
                "| hidden/heads/ffn | params | step | PyTorch | int8 ONNX | int8 drop | int8 p50 ms b1/s128 | int8 MB |", "|---|---|---|---|---|---|---|---|"]
        for m in r["family"]:
            w = m["widths"]
            drop = f"{t_score - m['onnx_int8']:.2f}" if t_score is not None and m["onnx_int8"] is not None else "—"
            out.append(f"| {w['hidden']}/{w['heads']}/{w['ffn']} | {m['parameters'] / 1e6:.2f}M | {m['step']} | {m['pytorch']:.2f} | "
                       f"{m['onnx_int8']:.2f} | {drop} | {m['int8_p50_ms_b1']:.2f} | {m['int8_mb']:.1f} |")
    return "\n".join(out) + ("\n" if out else "")


def _distill_s(row: dict[str, Any]) -> str:
    """Distillation wall time; where it counts only the steps after a checkpoint, it says so."""
    if not row.get("distill_s"):
        return "—"
    start = row.get("wall_time_from_step", row.get("resumed_from_step"))
    return f"{row['distill_s']} (steps after {start})" if start else str(row["distill_s"])


def _details(result: dict[str, Any]) -> str:
    """Every finished run: each metric per backend, wall time, int8 latency (and the load it was measured at)."""
    lines = ["", "| task | arm | seed | PyTorch | ONNX fp32 | ONNX int8 | lr | distill s | fine-tune s | int8 ms b1/s128 | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(values: dict | None) -> str:
        return " / ".join(f"{k} {v:.2f}" for k, v in (values or {}).items() if v is not None) or "—"

    for r in result["rows"]:
        m = r.get("metrics", {})
        load = r.get("load_average_1m") or {}
        lines.append(f"| {r['task']} | {r['arm']} | {r['seed']} | {fmt(m.get('pytorch'))} | {fmt(m.get('onnx_fp32'))} | {fmt(m.get('onnx_int8'))} "
                     f"| {r.get('lr') or '—'} | {_distill_s(r)} | {round(r['train_s']) if r.get('train_s') else '—'} "
                     f"| {r.get('int8_p50_ms_b1_s128') and round(r['int8_p50_ms_b1_s128'], 2) or '—'} "
                     f"| {'%.1f-%.1f' % (load['start'], load['end']) if load else '—'} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="mrpc,rte,cola,sst2")
    ap.add_argument("--arms", default="a,b,c", help=f"comma-separated: {', '.join(ARMS)}")
    ap.add_argument("--seeds", default="42")
    ap.add_argument("--encoder", type=Path, default=Path("../shared/models/all-MiniLM-L6-v2"))
    ap.add_argument("--glue-data", type=Path, default=Path("../shared/data/glue"))
    ap.add_argument("--work", type=Path, default=Path("runs/task_bench"))
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--table-only", action="store_true", help="rebuild the table from finished runs")
    ap.add_argument("--int8-keep-fp32", default="", help="also score each distilled student as int8 with these layer groups left fp32 "
                    "(comma-separated, as `homoexport export --keep-fp32`, e.g. ffn-output), under RUN/int8-keep-GROUPS")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                    help="run the distilled arms at this training.precision instead of their own: a CPU without native bf16 "
                    "emulates it many times slower than fp32 (recorded per row, and the table names such runs)")
    args = ap.parse_args(argv)
    tasks, arms = args.tasks.split(","), args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; allowed: {', '.join(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    all_tasks = sorted({*tasks, *[p.name.split("-", 1)[1] for p in args.work.glob("teacher-*") if (p / "glue_report.json").is_file()]},
                       key=lambda t: list(TEACHER_EPOCHS).index(t) if t in TEACHER_EPOCHS else 99)
    if not args.table_only:
        # Arm-major: the first arm's whole row lands before the next arm starts.
        for arm in arms:
            for task in tasks:
                ensure_teacher(args.work, task, args.encoder, args.glue_data)
                for seed in seeds:
                    run_arm(task, arm, seed, args.work, args.glue_data, tuple(g for g in args.int8_keep_fp32.split(",") if g), args.precision)
                    write(args, all_tasks)
    write(args, all_tasks)
    return 0


def write(args, tasks: Sequence[str]) -> None:
    previous = args.results / "task_distill.json"
    earlier = json.loads(previous.read_text())["rows"] if previous.is_file() else []
    tasks = sorted({*tasks, *(r["task"] for r in earlier)}, key=lambda t: list(TEACHER_EPOCHS).index(t) if t in TEACHER_EPOCHS else 99)
    result = collect(args.work, tasks, list(ARMS), earlier)
    md = markdown(result, tasks)
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results / "task_distill.json", result)
    atomic_write_text(args.results / "task_distill.md", md)
    print(md, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
