"""The ``homoexport`` command line: a thin Typer layer over the library functions.

Each command parses options, calls one library function with typed arguments, and prints its result.
No work is done here that a Python user could not do by calling the same function.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from homoexport import __version__
from homoexport.errors import EXIT_BUDGET, HomoexportError


class _App(typer.Typer):
    """Typer whose commands turn a :class:`HomoexportError` into one line and its exit code.

    Only that hierarchy is caught: any other exception is a bug and keeps its traceback.
    """

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)

        def decorator(fn):
            @functools.wraps(fn)
            def wrapper(*a, **kw):
                try:
                    return fn(*a, **kw)
                except HomoexportError as e:
                    fail(str(e), e.exit_code)

            return register(wrapper)

        return decorator


app = _App(
    name="homoexport",
    help="Compress BERT-class encoders with HomoDistil to a budget measured on this machine, export them to "
    "quantized ONNX, and validate accuracy and latency.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        print(f"homoexport {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """homoexport: HomoDistil -> ONNX int8 -> GLUE and latency reports."""


class _OtherLibraries(logging.StreamHandler):  # type: ignore[type-arg]
    """Root handler for other libraries' warnings, without homoexport's own lines (shown by the RichHandler).

    onnxruntime's quantizer logs through the root logger (``logging.info(...)``), which calls
    ``logging.basicConfig()`` when the root has no handler; that default handler then printed every homoexport
    line a second time. With this handler in place the root is configured and nothing is printed twice.
    """

    def __init__(self) -> None:
        super().__init__()
        self.setLevel(logging.WARNING)
        self.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
        self.addFilter(lambda record: not record.name.startswith("homoexport"))


def _log_to(out: Console) -> None:
    """Show the library's INFO/WARNING log lines (resume points, notes) on ``out``, once per process."""
    from rich.logging import RichHandler

    ours = logging.getLogger("homoexport")
    if not any(isinstance(h, RichHandler) for h in ours.handlers):
        ours.addHandler(RichHandler(console=out, show_time=False, show_path=False, markup=False))
        ours.setLevel(logging.INFO)
    root = logging.getLogger()
    if not any(isinstance(h, _OtherLibraries) for h in root.handlers):
        root.addHandler(_OtherLibraries())


def _check_out(out: Optional[Path]) -> None:
    """Fail with exit code 5 before any work when ``--out`` cannot be written."""
    if out is not None:
        from homoexport.atomic import ensure_writable

        try:
            ensure_writable(out)
        except HomoexportError as e:
            fail(str(e), e.exit_code)


def _check_model_dir(model_dir: Path) -> None:
    """Name a missing model directory at once, before the seconds that importing torch and optimum take."""
    if not (Path(model_dir) / "config.json").is_file():
        fail(f"not a model directory (no config.json): {model_dir}")


def _check_scored_model(model_dir: Path) -> None:
    """As :func:`_check_model_dir`, for what a scoring command takes: a model directory, or ONNX files scored as they
    are (a ``.onnx`` file, or a directory holding some; ``evaluation.glue.given_onnx`` checks them in full)."""
    if not (model_dir.suffix == ".onnx" or (model_dir.is_dir() and any(model_dir.glob("*.onnx")))):
        _check_model_dir(model_dir)


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error (no traceback) and exit with ``code``."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)  # one line, also in a log file
    raise typer.Exit(code)


# --- prune and distill -------------------------------------------------------------------


@app.command("prune")
def prune_command(
    model: str = typer.Argument(..., help="Model directory (BERT-class, with its tokenizer) to prune."),
    out: Path = typer.Option(..., "--out", help="Directory for the pruned model and prune_report.json."),
    hidden: Optional[int] = typer.Option(None, "--hidden", min=1, help="Target hidden size (default: keep)."),
    heads: Optional[int] = typer.Option(None, "--heads", min=1, help="Target attention heads; head_dim = hidden / heads (default: keep)."),
    ffn: Optional[int] = typer.Option(None, "--ffn", min=1, help="Target FFN (intermediate) size (default: keep)."),
    data: list[str] = typer.Option([], "--data", help="Text files/globs/dirs to score importance on (repeatable); default: synthetic token ids."),
    batches: int = typer.Option(8, "--batches", min=1, help="Batches used to score importance."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Sequences per scoring batch."),
    seq: int = typer.Option(128, "--seq", min=8, help="Tokens per scoring sequence."),
    importance: str = typer.Option("sensitivity", "--importance", help="Score: sensitivity | ema | platon."),
    seed: int = typer.Option(0, "--seed", help="Seed for synthetic data, masking and dropout."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
) -> None:
    """One-shot importance prune of a model to a target shape (no training); writes a loadable stock BERT."""
    _check_out(out)
    from homoexport.distillation.models import quiet_transformers
    from homoexport.pruning.oneshot import prune_model

    quiet_transformers()
    report = prune_model(model, out, hidden=hidden, heads=heads, ffn=ffn, data=data or None, batches=batches,
                         batch_size=batch_size, block_size=seq, importance=importance, seed=seed, overwrite=overwrite)
    b, a = report["before"], report["after"]
    console.print(f"pruned {model}: {_shape(b)} -> {_shape(a)}; parameters {b['parameters']:,} -> {a['parameters']:,} "
                  f"({report['parameter_ratio']:.1%}); parity max-abs-diff {report['parity_max_abs_diff']:.2e}; wrote {out}", highlight=False)


def _print_task_report(report: dict) -> None:
    s, t, metric = report["student"], report["teacher"], report["primary_metric"]
    deployed = report.get("deployed")
    if deployed:  # a run finished before task_distill/2 (and now resumed) named the int8 scores dev_int8
        scores = deployed.get("dev") or deployed["dev_int8"]
    int8 = f", int8 ONNX {scores[metric]:.2f} ({deployed['path']})" if deployed else ""
    console.print(f"student {_shape(s)} ({s['parameters']:,} params, teacher {t['parameters']:,}); {report['steps']} steps in "
                  f"{report['wall_time_s']:.0f}s; dev {metric}: teacher {t['dev'][metric]:.2f}, student {s['dev'][metric]:.2f}{int8}; "
                  f"wrote {s['path']}", highlight=False)
    best = report.get("keep_best")
    if best:
        console.print(f"task.keep_best: the student of step {best['step']} of {report['steps']} (dev {metric} {s['dev'][metric]:.2f}; "
                      f"the last step's {best['last_step_dev'][metric]:.2f})", highlight=False)
    if len(report.get("family", [])) > 1:
        from homoexport.cli.tables import family_table

        console.print(family_table(report))
    sel = report.get("selection")
    if sel:
        if sel["met"]:
            verdict = f"chose {sel['chosen']}"
        elif sel.get("over_budget"):
            verdict = f"missed: {sel['over_budget']} is within it but over the budget; deployed the final student"
        else:
            verdict = f"missed: the smallest drop is {sel['best_drop']:.2f} points"
        console.print(f"accuracy-drop <= {sel['max_drop']:g} points of {metric} ({sel['scored']}): {verdict}", highlight=False)
    check = report.get("latency_check")
    if check:
        console.print(f"latency budget {check['budget']}: the deployed int8 file times {check['p50_ms']:.2f} ms at batch 1 / seq "
                      f"{check['seq']} ({'within it' if check['met'] else 'over it'}; the plan predicted {_ms(check['predicted_p50_ms'])})",
                      highlight=False)


def budget_missed(report: dict) -> bool:
    """A task run that finished but missed its budget: no student within accuracy-drop, or the shipped file over the latency."""
    sel, check = report.get("selection"), report.get("latency_check")
    return bool((sel and not sel["met"]) or (check and not check["met"]))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def _shape(r: dict) -> str:
    w = r["widths"]
    return f"{r['layers']}L hidden {w['hidden']} heads {w['heads']}x{w['head_dim']} ffn {w['ffn']}"


@app.command("distill")
def distill_command(
    recipe: Path = typer.Argument(..., help="YAML recipe (see recipes/)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key, e.g. --set training.steps=200, or --set task.epochs=2 in a task recipe (repeatable; values parsed as YAML)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: the recipe's output)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in the run directory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in a non-empty run directory."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    budget: Optional[str] = typer.Option(None, "--budget", help="Choose the student widths with `homoexport plan` on this machine first "
                                         "(batch 1, seq 128, all physical cores, int8), e.g. latency=8ms | memory=30MB | params=20M; task recipes also "
                                         "accuracy-drop=1 (points of the dev metric: deploy the narrowest task.family student within it), alone or "
                                         "with the others, e.g. latency=8ms,accuracy-drop=1. Overrides the recipe's budget; the plan goes into "
                                         "report.json. A finished task run that misses it exits 7."),
    plan_file: Optional[Path] = typer.Option(None, "--plan", help="Take the student widths from a plan.json written by `homoexport plan` "
                                             "(e.g. from measurements on the target device) instead of planning here."),
    layers: Optional[str] = typer.Option(None, "--layers", help="With --budget: student depths the planner may choose from, e.g. 6,4,3 "
                                         "(default: the recipe's depth). A shallower winner starts from evenly spaced teacher layers "
                                         "(init truncate, uniform layer mapping); see the README on width vs depth."),
    assistant: Optional[str] = typer.Option(None, "--assistant", help="Teacher assistant (MiniDisc): auto = choose its width with one "
                                            "weight-shared sandwich run and the λ-tradeoff of the recipe's assistant section; HIDDEN = use that "
                                            "hidden size; off = none. Then distills teacher -> assistant -> student (OUT/stage1-assistant, "
                                            "OUT/stage2-student, OUT/student). Default: the recipe's assistant.mode (off)."),
) -> None:
    """HomoDistil: copy the teacher, prune its width on a schedule while distilling, save the dense student.

    Writes OUT/student (AutoModel-loadable), report.json, recipe.resolved.yaml, train_log.jsonl; a task recipe also OUT/export
    (the int8 ONNX file, scored on dev). OUT/checkpoints holds the newest checkpoint while the run goes (removed at the end
    unless training.keep_checkpoints).
    Runs on one CPU or, under `accelerate launch -m homoexport distill ...`, on many processes/GPUs/nodes."""
    _check_out(out)
    from homoexport.config.recipe import load_recipe, with_assistant_option

    r = with_assistant_option(load_recipe(recipe, set_), assistant)  # recipe errors come before the heavy imports
    from homoexport.cli.progress import StepProgress
    from homoexport.cli.tables import tradeoff_table
    from homoexport.deployment.budget import default_cache_path, parse_depths, plan_for_recipe
    from homoexport.distillation.assistant import distill_with_assistant
    from homoexport.distillation.checkpoint import check_run_dir
    from homoexport.distillation.models import quiet_transformers
    from homoexport.distillation.trainer import distill

    quiet_transformers()
    _log_to(console)  # before the plan: onnxruntime's quantizer would otherwise configure the root logger and print every line twice
    check_run_dir(out or r.output_dir(), resume, overwrite)  # before the minutes a budget plan takes
    if r.task is not None and (budget or plan_file or r.budget):  # without a plan, distill_task reads them first anyway
        from homoexport.distillation.task import check_task_inputs

        check_task_inputs(r)
    with StepProgress("plan", console, enabled=progress) as bar:
        r, plan = plan_for_recipe(r, budget=budget, plan_file=plan_file, cache_path=default_cache_path(), on_progress=bar.update,
                                  depths=parse_depths(layers))
    if plan:
        console.print(f"plan: {plan['chosen']['name']} for {plan['budget']}", highlight=False)
    try:
        with StepProgress("distill", console, enabled=progress) as bar:
            if r.task is not None:
                from homoexport.distillation.task import distill_task

                report = distill_task(r, out_dir=out, resume=resume, overwrite=overwrite, on_log=bar.update, plan=plan)
            elif r.assistant.mode != "off":
                report = distill_with_assistant(r, out_dir=out, resume=resume, overwrite=overwrite, on_log=bar.update, plan=plan)
            else:
                report = distill(r, out_dir=out, resume=resume, overwrite=overwrite, on_log=bar.update, plan=plan)
    except KeyboardInterrupt:
        run_dir = out or r.output_dir()
        saved = sorted((run_dir / "checkpoints").glob("step-*.pt")) if (run_dir / "checkpoints").is_dir() else []
        where = f"the newest checkpoint is {saved[-1]}" if saved else "no checkpoint was written yet"
        fail(f"interrupted; {where}: run the same command with --resume to continue", 130)
    if report and str(report.get("schema", "")).startswith("homoexport.task_distill/"):
        _print_task_report(report)
        if budget_missed(report):
            fail(f"the budget was missed (above); everything was written to {Path(report['student']['path']).parent}", EXIT_BUDGET)
        return
    if report:
        s, t = report["student"], report["teacher"]
        console.print(f"student {_shape(s)} ({s['parameters']:,} params, teacher {t['parameters']:,}); "
                      f"{report['steps']} steps in {report['wall_time_s']:.0f}s; parity max |diff| {_sci(report['parity_max_abs_diff'])}; "
                      f"wrote {s['path']}", highlight=False)
        if report.get("selection", {}).get("candidates"):
            console.print(tradeoff_table(report["selection"]))
        if "assistant" in report:
            console.print(f"assistant {_shape(report['assistant'])} ({report['assistant']['parameters']:,} params)", highlight=False)


# --- bench ---------------------------------------------------------------------------------
# Library modules are imported inside the command so that `homoexport bench` never imports torch.


@app.command(
    "bench",
    epilog="Exit codes: 0 ok; 1 latency or accuracy regression beyond the limit; 2 bad arguments or unreadable "
    "inputs; 3 an entry of the baseline is missing from this run; 4 the baseline was measured on another machine "
    "(latencies not compared; see --allow-machine-mismatch). With several failures the lowest code wins.",
)
def bench_command(
    paths: list[str] = typer.Argument(
        ...,
        metavar="PATH...",
        help="ONNX files or export directories (every *.onnx inside). NAME=PATH sets the name used as the compare key; "
        "by default a model is named <directory>/<file stem>.",
    ),
    batch: str = typer.Option("1", "--batch", help="Batch sizes, comma-separated (e.g. 1,8)."),
    seq: str = typer.Option("128", "--seq", help="Sequence lengths in tokens, comma-separated (e.g. 32,128); the maximum length under --seq-dist."),
    threads: str = typer.Option("all", "--threads", help="onnxruntime intra-op thread counts, comma-separated; 'all' = all physical cores (e.g. 1,all)."),
    warmup: int = typer.Option(10, "--warmup", min=0, help="Untimed runs before timing each grid point."),
    repeats: Optional[int] = typer.Option(None, "--repeats", min=1, help="Timed runs per grid point (default 50). Exclusive with --duration."),
    duration: Optional[float] = typer.Option(None, "--duration", min=0.001, help="Time each grid point for this many seconds instead of a fixed number of runs."),
    seq_dist: str = typer.Option(
        "fixed",
        "--seq-dist",
        help="Sequence lengths: 'fixed' (every sequence --seq tokens); 'uniform' (random lengths up to --seq, each batch padded "
        "to its longest, as a server with dynamic padding sends it); 'text' (the lengths of --text lines, capped at --seq).",
    ),
    text: Optional[Path] = typer.Option(
        None, "--text", help="Plain-text file, one sentence per line, tokenized with the tokenizer.json next to each model for real token ids "
        "(without it: random whole words of that vocabulary; without a tokenizer.json: random ids).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the generated inputs."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the report as JSON (machine fingerprint, settings, per-model size/load/memory, "
                                       "latencies, accuracy, comparison). Default: bench.json in the first PATH when it is a directory (an export "
                                       "directory), so `homoexport report` finds it; with a file PATH and no --out, no JSON is written."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Directory to write PNGs of latency vs batch and seq (one per model, plus all models together)."),
    glue: list[str] = typer.Option(
        [], "--glue", help="glue_report.json (or a directory holding one; NAME=PATH to label it) whose accuracies are recorded and gated; "
        "repeatable. A glue_report.json inside a benchmarked directory is picked up automatically.",
    ),
    compare: Optional[Path] = typer.Option(None, "--compare", help="Baseline bench JSON (an earlier --out) to gate against; see the exit codes below."),
    max_regression: str = typer.Option("10%", "--max-regression", help="Allowed latency growth per matching entry (model, batch, seq, threads, seq-dist), e.g. 10% or 0.1."),
    metric: str = typer.Option("p50_ms", "--metric", help="Latency statistic gated by --max-regression: p50_ms, p90_ms, p99_ms or mean_ms."),
    max_accuracy_drop: Optional[float] = typer.Option(
        None, "--max-accuracy-drop", min=0.0, help="Allowed accuracy loss in points (0-100 scale) per GLUE task/metric/variant versus the baseline's; off when not given.",
    ),
    allow_machine_mismatch: bool = typer.Option(
        False, "--allow-machine-mismatch", help="Compare latencies even when the baseline's CPU, ISA, cores or onnxruntime version differ (e.g. to gate an onnxruntime upgrade).",
    ),
) -> None:
    """Measure ONNX models with onnxruntime: latency (mean, p50/p90/p99, stdev), throughput, file size, load time and
    peak RSS of the session, on this machine (fingerprint recorded). Prints a markdown table; with --compare, gates
    against a baseline for CI. Needs only onnxruntime + numpy (no torch)."""
    if out is None and paths and Path(paths[0].split("=", 1)[-1]).is_dir():
        out = Path(paths[0].split("=", 1)[-1]) / "bench.json"
    _check_out(out)
    from homoexport.deployment.bench import (
        BenchSettings,
        parse_fraction,
        parse_int_list,
        parse_threads,
        run_bench,
    )

    if repeats is not None and duration is not None:
        fail("--repeats and --duration are exclusive: give one")
    settings = BenchSettings(
        batches=parse_int_list(batch, "--batch"),
        seqs=parse_int_list(seq, "--seq"),
        threads=parse_threads(threads),
        warmup=warmup,
        repeats=repeats or 50,
        duration_s=duration,
        seq_dist=seq_dist,
        text=text,
        seed=seed,
    )
    from homoexport.cli.progress import StepProgress

    with StepProgress("bench", console) as bar:
        outcome = run_bench(
            paths, settings, out=out, plot_dir=plot, glue=glue, baseline=compare, max_regression=parse_fraction(max_regression),
            metric=metric, max_accuracy_drop=max_accuracy_drop, allow_machine_mismatch=allow_machine_mismatch, on_progress=bar.update,
        )
    print(outcome.markdown)
    for path in ([out] if out else []) + outcome.plots:
        console.print(f"wrote {path}", highlight=False)
    raise typer.Exit(outcome.exit_code)


# --- report --------------------------------------------------------------------------------


@app.command("report")
def report_command(
    run_dirs: list[Path] = typer.Argument(..., metavar="RUN_DIR...", help="Run directories, searched recursively for report.json (distill), export_report.json, glue_report.json and bench.json."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory to write report.md and its PNGs into (default: FIRST_RUN_DIR/report, replaced on every run)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
) -> None:
    """Gather the distill, export, GLUE and bench reports of runs into one report.md (+ accuracy-vs-latency Pareto
    and width-schedule plots), readable in a browser or a PR comment. Missing reports are skipped and said so."""
    if out is None:  # the default is a derived artifact of the first run: rewrite it each time
        out, overwrite = Path(run_dirs[0]) / "report", True
    _check_out(out)
    from homoexport.reporting.report import SECTIONS, write_report

    path, gathered = write_report(run_dirs, out, overwrite=overwrite)
    for section in SECTIONS:
        n = len(gathered.found.get(section.key, []))
        console.print(f"{section.title}: {n} {section.filename}" if n else f"{section.title}: none found, skipped", highlight=False)
    for problem in gathered.problems:
        console.print(f"[yellow]warning:[/] {problem}", highlight=False)
    console.print(f"wrote {path}", highlight=False)


# --- glue, glue-suite ----------------------------------------------------------------------
# Options shared by both commands are declared once; the library is imported inside the commands.

_GLUE_DATA_DIR = typer.Option(None, "--data-dir", help="GLUE data in the original TSV layout: DIR/SST-2/train.tsv, DIR/CoLA (no header), DIR/MNLI/dev_matched.tsv, ...")
_GLUE_HUB = typer.Option(False, "--hub", help="Load nyu-mll/glue from the Hugging Face hub instead of --data-dir (needs network or a warm cache).")
_GLUE_EPOCHS = typer.Option(3.0, "--epochs", min=0.01, help="Training epochs (fractions allowed).")
_GLUE_LR = typer.Option(5e-5, "--lr", min=0.0, help="Peak learning rate of AdamW (linear warm-up, then linear decay to 0).")
_GLUE_BATCH = typer.Option(32, "--batch-size", min=1, help="Training batch size (dynamic padding).")
_GLUE_EVAL_BATCH = typer.Option(64, "--eval-batch-size", min=1, help="Batch size of every dev-set evaluation, and so of the reported latency per batch.")
_GLUE_MAX_LENGTH = typer.Option(128, "--max-length", min=8, help="Truncate each example (pairs longest-first) to this many tokens.")
_GLUE_WARMUP = typer.Option(0.1, "--warmup-ratio", min=0.0, max=0.99, help="Fraction of the training steps spent warming the learning rate up from 0.")
_GLUE_WEIGHT_DECAY = typer.Option(0.01, "--weight-decay", min=0.0, help="AdamW weight decay.")
_GLUE_SEEDS = typer.Option("42", "--seeds", "--seed", help="Seed, or comma-separated seeds (e.g. 1,2,3): one fine-tune per seed, reported as mean ± std.")
_GLUE_EVAL_STEPS = typer.Option(None, "--eval-steps", min=1, help="Evaluate on dev and checkpoint every N steps (and at the last step); default once per epoch. The best dev checkpoint is kept.")
_GLUE_MAX_TRAIN = typer.Option(None, "--max-train-samples", min=1, help="Fine-tune on a fixed random subset of this many training examples (the same subset for every seed), to fit a time budget.")
_GLUE_MAX_EVAL = typer.Option(None, "--max-eval-samples", min=1, help="Evaluate on a fixed random subset of this many examples of each dev split.")
_GLUE_EXPORT = typer.Option(True, "--export/--no-export", help="Export the fine-tuned model (ONNX fp32, O2-optimized, int8) and score the fp32 and int8 files with onnxruntime.")
_GLUE_QUANTIZE = typer.Option("dynamic", "--quantize", help="int8 quantization of the export: dynamic or static.")
_GLUE_KEEP_FP32 = typer.Option("", "--keep-fp32", help="Comma-separated layer groups left fp32 in the int8 export (see `homoexport export --help`), e.g. ffn-output.")
_GLUE_THREADS = typer.Option(None, "--threads", min=1, help="Threads for the dev-set evaluation of every backend (default: all physical cores).")
_GLUE_OVERWRITE = typer.Option(False, "--overwrite", help="Replace --out if it exists.")
_GLUE_TRAIN = typer.Option(True, "--train/--no-train", help="--no-train scores MODEL_DIR as it is (a task-distilled student or a fine-tuned "
                           "teacher, whose head is already for the task): PyTorch, ONNX fp32 and ONNX int8 on dev, no fine-tuning "
                           "(the training options are then unused).")


def _groups(value: str) -> tuple[str, ...]:
    """A comma-separated option as a tuple of its non-empty items."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _glue_settings(epochs: float, lr: float, batch_size: int, eval_batch_size: int, max_length: int, warmup_ratio: float, weight_decay: float,
                   seeds: str, eval_steps: Optional[int], max_train_samples: Optional[int], max_eval_samples: Optional[int], export: bool,
                   quantize: str, keep_fp32: str, threads: Optional[int], train: bool = True):
    from homoexport.evaluation.glue import GlueSettings

    try:
        seed_list = tuple(int(s) for s in seeds.split(","))
    except ValueError:
        fail(f"--seeds must be integers separated by commas, got {seeds!r}")
    return GlueSettings(
        epochs=epochs, learning_rate=lr, batch_size=batch_size, eval_batch_size=eval_batch_size, max_length=max_length, warmup_ratio=warmup_ratio,
        weight_decay=weight_decay, seeds=seed_list, eval_steps=eval_steps, max_train_samples=max_train_samples, max_eval_samples=max_eval_samples,
        export=export, quantize=quantize, keep_fp32=_groups(keep_fp32), threads=threads, train=train,
    )


@app.command("glue")
def glue_command(
    model_dir: Path = typer.Argument(..., help="Encoder or student to fine-tune (a classification head is added when it has none); "
                                     "with --no-train, a finished classifier or its ONNX files, as `homoexport score` takes them."),
    task: str = typer.Option(..., "--task", help="GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte or wnli."),
    out: Path = typer.Option(..., "--out", help="Run directory: glue_report.json/.md, seed-S/model (best dev checkpoint), seed-S/onnx (export)."),
    data_dir: Optional[Path] = _GLUE_DATA_DIR,
    hub: bool = _GLUE_HUB,
    epochs: float = _GLUE_EPOCHS,
    lr: float = _GLUE_LR,
    batch_size: int = _GLUE_BATCH,
    eval_batch_size: int = _GLUE_EVAL_BATCH,
    max_length: int = _GLUE_MAX_LENGTH,
    warmup_ratio: float = _GLUE_WARMUP,
    weight_decay: float = _GLUE_WEIGHT_DECAY,
    seeds: str = _GLUE_SEEDS,
    eval_steps: Optional[int] = _GLUE_EVAL_STEPS,
    max_train_samples: Optional[int] = _GLUE_MAX_TRAIN,
    max_eval_samples: Optional[int] = _GLUE_MAX_EVAL,
    export: bool = _GLUE_EXPORT,
    quantize: str = _GLUE_QUANTIZE,
    keep_fp32: str = _GLUE_KEEP_FP32,
    threads: Optional[int] = _GLUE_THREADS,
    overwrite: bool = _GLUE_OVERWRITE,
    train: bool = _GLUE_TRAIN,
) -> None:
    """Fine-tune MODEL_DIR on one GLUE task (or, with --no-train, take it as it is), export it to ONNX fp32 + int8, and
    score PyTorch, ONNX fp32 and ONNX int8 on the same dev set: metric (points), int8-vs-PyTorch delta, dev-set latency and throughput, exact settings."""
    _check_out(out)
    if train:
        _check_model_dir(model_dir)
    else:
        _check_scored_model(model_dir)
    from homoexport.cli.tables import glue_table
    from homoexport.evaluation.glue import run_glue

    settings = _glue_settings(epochs, lr, batch_size, eval_batch_size, max_length, warmup_ratio, weight_decay, seeds, eval_steps,
                              max_train_samples, max_eval_samples, export, quantize, keep_fp32, threads, train)
    from homoexport.cli.progress import StepProgress

    _log_to(console)
    with StepProgress("glue", console) as bar:
        report = run_glue(model_dir, task, out, settings, data_dir=data_dir, hub=hub, overwrite=overwrite, on_progress=bar.update)
    Console().print(glue_table(report))
    console.print(f"wrote {out / 'glue_report.json'}", highlight=False)


@app.command("score")
def score_command(
    model_dir: Path = typer.Argument(..., help="A finished classifier: a task-distilled student (OUT/student) or a fine-tuned teacher; "
                                     "or ONNX files to score as they are, without exporting again: an export directory (OUT/export, with "
                                     "its config.json and tokenizer) or one .onnx file in it."),
    dev_file: Optional[Path] = typer.Option(None, "--dev-file", help="Your labelled dev set: CSV, TSV or JSON lines with named columns. "
                                            "Labels are the model's class names (its id2label) or class ids; numbers for a regression head."),
    text_column: str = typer.Option("sentence", "--text-column", help="Column of the text (as task.text_column in a task recipe)."),
    text_pair_column: Optional[str] = typer.Option(None, "--text-pair-column", help="Column of the second text, for sentence pairs."),
    label_column: str = typer.Option("label", "--label-column", help="Column of the label."),
    task: Optional[str] = typer.Option(None, "--task", help="Or a GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli), read from --data-dir."),
    data_dir: Optional[Path] = _GLUE_DATA_DIR,
    out: Path = typer.Option(..., "--out", help="Run directory: glue_report.json/.md, seed-42/onnx (the exported files that were scored; "
                             "none when ONNX files were given)."),
    eval_batch_size: int = _GLUE_EVAL_BATCH,
    max_length: int = _GLUE_MAX_LENGTH,
    max_eval_samples: Optional[int] = _GLUE_MAX_EVAL,
    quantize: str = _GLUE_QUANTIZE,
    keep_fp32: str = _GLUE_KEEP_FP32,
    threads: Optional[int] = _GLUE_THREADS,
    overwrite: bool = _GLUE_OVERWRITE,
) -> None:
    """Score a finished classifier without training it: PyTorch, ONNX fp32 and ONNX int8 (exported, fused and quantized
    here) on your dev file or a GLUE dev set, with the int8-vs-PyTorch delta and dev-set latency. Given ONNX files, scores
    exactly those files (e.g. the shipped int8 file, on the target machine)."""
    if (dev_file is None) == (task is None):
        fail("give --dev-file (your labelled dev set) or --task (a GLUE task), not both")
    _check_out(out)
    _check_scored_model(model_dir)
    from homoexport.cli.progress import StepProgress
    from homoexport.cli.tables import glue_table
    from homoexport.evaluation.glue import DevFile, GlueSettings, run_glue, score_dev_file

    settings = GlueSettings(train=False, eval_batch_size=eval_batch_size, max_length=max_length, max_eval_samples=max_eval_samples,
                            quantize=quantize, keep_fp32=_groups(keep_fp32), threads=threads)
    _log_to(console)
    with StepProgress("score", console) as bar:
        if dev_file is not None:
            dev = DevFile(dev_file, text_column, text_pair_column, label_column)
            report = score_dev_file(model_dir, dev, out, settings, overwrite=overwrite, on_progress=bar.update)
        else:
            assert task is not None
            report = run_glue(model_dir, task, out, settings, data_dir=data_dir, overwrite=overwrite, on_progress=bar.update)
    Console().print(glue_table(report))
    console.print(f"wrote {out / 'glue_report.json'}", highlight=False)


@app.command("glue-suite")
def glue_suite_command(
    model_dir: Path = typer.Argument(..., help="Encoder or student to fine-tune on every task."),
    tasks: str = typer.Option("mnli,qqp,qnli,sst2,cola,stsb,mrpc,rte", "--tasks", help="Comma-separated GLUE tasks (any order; the table follows the GLUE paper's order)."),
    out: Path = typer.Option(..., "--out", help="Directory: glue_suite.json/.md and one run directory per task."),
    data_dir: Optional[Path] = _GLUE_DATA_DIR,
    hub: bool = _GLUE_HUB,
    epochs: float = _GLUE_EPOCHS,
    lr: float = _GLUE_LR,
    batch_size: int = _GLUE_BATCH,
    eval_batch_size: int = _GLUE_EVAL_BATCH,
    max_length: int = _GLUE_MAX_LENGTH,
    warmup_ratio: float = _GLUE_WARMUP,
    weight_decay: float = _GLUE_WEIGHT_DECAY,
    seeds: str = _GLUE_SEEDS,
    eval_steps: Optional[int] = _GLUE_EVAL_STEPS,
    max_train_samples: Optional[int] = _GLUE_MAX_TRAIN,
    max_eval_samples: Optional[int] = _GLUE_MAX_EVAL,
    export: bool = _GLUE_EXPORT,
    quantize: str = _GLUE_QUANTIZE,
    keep_fp32: str = _GLUE_KEEP_FP32,
    threads: Optional[int] = _GLUE_THREADS,
    overwrite: bool = _GLUE_OVERWRITE,
) -> None:
    """Run `homoexport glue` on several tasks with the same settings and write one table (markdown + JSON) in the GLUE
    paper's column order (MNLI, QQP, QNLI, SST-2, CoLA, STS-B, MRPC, RTE) with the average, for each backend."""
    _check_out(out)
    _check_model_dir(model_dir)
    from homoexport.cli.tables import glue_suite_table
    from homoexport.evaluation.glue import run_glue_suite

    settings = _glue_settings(epochs, lr, batch_size, eval_batch_size, max_length, warmup_ratio, weight_decay, seeds, eval_steps,
                              max_train_samples, max_eval_samples, export, quantize, keep_fp32, threads)
    from homoexport.cli.progress import StepProgress

    _log_to(console)
    with StepProgress("glue", console) as bar:
        suite = run_glue_suite(model_dir, [t.strip() for t in tasks.split(",") if t.strip()], out, settings, data_dir=data_dir, hub=hub,
                               overwrite=overwrite, on_progress=bar.update)
    Console().print(glue_suite_table(suite))
    console.print(f"wrote {out / 'glue_suite.json'} and {out / 'glue_suite.md'}", highlight=False)


# --- sts -------------------------------------------------------------------------------------


@app.command("sts")
def sts_command(
    model_dir: Path = typer.Argument(..., help="Encoder to score (a distilled student, or any BERT-class model directory)."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="Score the teacher too, and pool every model as the teacher declares."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Export directory of MODEL_DIR (`homoexport export --task feature-extraction`): "
                                         "score its fp32 and int8 ONNX files too."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="GLUE data directory: scores STS-B dev (1,500 pairs)."),
    pairs: Optional[Path] = typer.Option(None, "--pairs", help="Your own pairs instead: a TSV with a header naming sentence1, sentence2, score."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the report as JSON (schema homoexport.sts/1)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Threads for every backend (default: all physical cores)."),
    max_int8_drop: Optional[float] = typer.Option(None, "--max-int8-drop", min=0.0, help="Gate (exit 1): the int8 file may score at most this many "
                                                  "STS points below the PyTorch student (needs --onnx). The report also gives the cosine of every "
                                                  "int8 sentence embedding to the fp32 one."),
) -> None:
    """Zero-shot STS, as sentence-embedding users measure it: Spearman x 100 between the gold score and the cosine
    of the two pooled sentence embeddings (pooling from the model's sentence-transformers files, mean otherwise),
    no fine-tuning; PyTorch, ONNX fp32 and ONNX int8 beside the teacher."""
    _check_out(out)
    _check_model_dir(model_dir)
    if (data_dir is None) == (pairs is None):
        fail("give --data-dir (STS-B dev) or --pairs FILE, not both and not neither")
    if max_int8_drop is not None and onnx is None:
        fail("--max-int8-drop needs --onnx EXPORT_DIR (the int8 file to gate)")
    from homoexport.evaluation.sts import read_pairs, run_sts, stsb_dev

    _log_to(console)
    report = run_sts(model_dir, stsb_dev(data_dir) if data_dir else read_pairs(pairs), teacher=teacher, export_dir=onnx, threads=threads)
    print(f"| model | STS Spearman x 100 ({report['data']}) |\n|---|---:|")
    for r in report["results"]:
        print(f"| {r['name']} | {r['spearman']:.2f} |")
    int8 = report["int8"]
    if int8:
        print(f"\nint8 vs fp32 sentence embeddings: cosine mean {int8['cosine_to_fp32_mean']:.4f}, min {int8['cosine_to_fp32_min']:.4f}; "
              f"STS {-int8['spearman_drop_vs_pytorch']:+.2f} points against the PyTorch student")
    if out is not None:
        from homoexport.atomic import atomic_write_json

        atomic_write_json(out, report)
        console.print(f"wrote {out}", highlight=False)
    if max_int8_drop is not None:
        from homoexport.errors import RegressionError

        if int8 is None:
            fail(f"no int8 file in {onnx} to gate")
        if int8["spearman_drop_vs_pytorch"] > max_int8_drop:
            raise RegressionError(f"the int8 file scores {int8['spearman_drop_vs_pytorch']:.2f} STS points below the PyTorch student "
                                  f"(allowed {max_int8_drop:g})")


# --- export --------------------------------------------------------------------------------


@app.command("export")
def export_command(
    model_dir: Path = typer.Argument(..., help="Model directory (config.json, weights, tokenizer): a student from prune/distill, the teacher, or a glue fine-tune."),
    onnx: bool = typer.Option(False, "--onnx", help="Export to ONNX (the only format; required)."),
    out: Path = typer.Option(..., "--out", help="EXPORT_DIR: model.onnx (fp32), model_optimized.onnx, model_quantized.onnx, config.json, tokenizer files, export_report.json."),
    task: str = typer.Option("auto", "--task", help="feature-extraction | fill-mask | text-classification | auto (from config.architectures: *Model, *ForMaskedLM, *ForSequenceClassification)."),
    optimize: str = typer.Option("O2", "--optimize", help="ORTOptimizer level: none | O1 (generic graph optimizations) | O2 (+ fused Attention, LayerNorm, GELU; checked against the layer count) | O3 (O2 + approximate GELU)."),
    quantize: str = typer.Option("dynamic", "--quantize", help="int8 quantization: none | dynamic | static (needs --calibration-data)."),
    target: str = typer.Option("auto", "--target", help="int8 kernels to quantize for: auto (this CPU's flags) | avx2 | avx512 | avx512_vnni | arm64."),
    per_channel: bool = typer.Option(True, "--per-channel/--no-per-channel", help="Per-channel weight scales (same speed; per-tensor loses accuracy on real encoders)."),
    keep_fp32: str = typer.Option("", "--keep-fp32", help="Comma-separated layer groups whose MatMuls stay fp32 in the int8 file: ffn-output (each layer's FFN down-projection; "
                                  "recovers the int8 loss on CoLA for ~30% more int8 latency, benchmarks/results/int8_keep_fp32.json)."),
    calibration_data: Optional[Path] = typer.Option(None, "--calibration-data", help="Static quantization: a .txt(.gz) file, one text per line, or a GLUE .tsv with a header (sentence, sentence1/sentence2, question/sentence)."),
    calibration_samples: int = typer.Option(200, "--calibration-samples", min=1, help="Texts read from --calibration-data."),
    validation_data: Optional[Path] = typer.Option(None, "--validation-data", help="Inputs the parity checks and the int8 gate run on (the first 256), "
                                                   "in --calibration-data's formats. Default: 16 built-in English sentences, which suit an "
                                                   "encoder; give a classifier its task's own inputs, or near-boundary built-in texts may fail its gate."),
    opset: Optional[int] = typer.Option(None, "--opset", min=11, help="ONNX opset (default: optimum's for the architecture)."),
    order: str = typer.Option("auto", "--order", help="How the int8 file is built: fuse-first (quantize the fused graph) | quantize-first (quantize, then fuse what ORT can) | auto (build both, keep the faster at batch 1 / seq 128)."),
    atol: float = typer.Option(1e-4, "--atol", min=0.0, help="Largest allowed |ONNX fp32 - PyTorch| (and optimized, except O3: 1e-2) on last_hidden_state/logits."),
    int8_min_cosine: float = typer.Option(0.97, "--int8-min-cosine", min=0.0, max=1.0, help="feature-extraction: smallest allowed cosine between int8 and fp32 mean-pooled embeddings of any validation text."),
    int8_min_agreement: float = typer.Option(0.9, "--int8-min-agreement", min=0.0, max=1.0, help="text-classification / fill-mask: smallest allowed share of int8 predictions (classes / top-1 tokens) equal to fp32's."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="onnxruntime threads for the report's latency figures (default: all physical cores)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace EXPORT_DIR if it exists."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    sentence_embedding: bool = typer.Option(False, "--sentence-embedding", help="Feature-extraction models: add the pooled sentence "
                                            "embedding (the model's declared pooling, mean by default, L2-normalised when declared) as the graph "
                                            "output sentence_embedding, checked against PyTorch, so any runtime gets the embedding directly."),
) -> None:
    """Export MODEL_DIR to ONNX through optimum, fuse it (ORTOptimizer), quantize it to int8 (ORTQuantizer), and validate
    every file: fp32 vs PyTorch, int8 vs fp32, fused Attention count; latency at batch 1 / seq 128. Any failed check stops
    the export and leaves EXPORT_DIR untouched."""
    _check_out(out)
    _check_model_dir(model_dir)
    from homoexport.cli.tables import export_table
    from homoexport.deployment.export import VALIDATION_ROWS, VALIDATION_TEXTS, ExportSettings, export_model, read_texts
    from homoexport.distillation.models import quiet_transformers

    quiet_transformers()
    if not onnx:
        fail("nothing to export: pass --onnx (the only export format)")
    validation_texts = tuple(read_texts(validation_data, VALIDATION_ROWS, "validation data")) if validation_data else VALIDATION_TEXTS
    from homoexport.cli.progress import StepProgress

    with StepProgress("export", console, enabled=progress) as bar:
        report = export_model(model_dir, out, ExportSettings(
            task=task, optimize=optimize, quantize=quantize, target=target, per_channel=per_channel, keep_fp32=_groups(keep_fp32),
            calibration_data=calibration_data, opset=opset, order=order, atol=atol, int8_min_cosine=int8_min_cosine,
            int8_min_agreement=int8_min_agreement, calibration_samples=calibration_samples, latency_threads=threads,
            sentence_embedding=sentence_embedding, validation_texts=validation_texts,
        ), overwrite=overwrite, on_progress=bar.update)
    Console().print(export_table(report))
    console.print(f"wrote {out} ({report['deployed_file']} is the file to deploy); report: {out / 'export_report.json'}", highlight=False)


# --- plan, measure -------------------------------------------------------------------------


@app.command("plan")
def plan_command(
    teacher: Path = typer.Option(..., "--teacher", help="Teacher model directory (BERT-class); candidates are the shapes HomoDistil can reach from it."),
    budget: Optional[str] = typer.Option(
        None, "--budget", help="Constraints, comma-separated, all must hold: latency=8ms (p50 at --batch/--seq/--threads/--precision), "
        "memory=30MB (deployed file size, MB = 2^20 bytes), rss=120MB (peak RSS an inference session adds), params=20M. Required unless --export-candidates.",
    ),
    batch: int = typer.Option(1, "--batch", min=1, help="Batch size the latency and RSS are measured at."),
    seq: int = typer.Option(128, "--seq", min=1, help="Sequence length (tokens) the latency and RSS are measured at."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="onnxruntime intra-op threads (default: all physical cores of the measuring machine)."),
    precision: str = typer.Option("int8", "--precision", help="int8 (export with --quantize dynamic) or fp32 (--quantize none: the O2-optimized fp32 file)."),
    task: str = typer.Option("feature-extraction", "--task", help="What is deployed: feature-extraction (the encoder) | text-classification | fill-mask (adds the vocabulary projection)."),
    candidates: Optional[str] = typer.Option(None, "--candidates", help="Only these shapes, comma-separated: HIDDEN (heads and FFN derived) or HIDDEN:HEADS:FFN, e.g. 128,256:8:1024."),
    multiple: int = typer.Option(16, "--multiple", help="Hidden sizes and FFN are multiples of this (8, 16, 32 or 64)."),
    ffn_ratio: Optional[float] = typer.Option(None, "--ffn-ratio", min=0.01, help="FFN = hidden x this (default: the teacher's FFN/hidden)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Student depths to search, comma-separated, e.g. 6,4,3 (default: the "
                                         "teacher's, as HomoDistil keeps it). Each depth is searched on its own; the fitting shape with the most "
                                         "non-embedding parameters wins, and the report keeps every depth's best and Pareto front."),
    margin: float = typer.Option(0.05, "--margin", min=0.0, max=0.5, help="Safety margin on measured figures (latency, rss): a shape fits when it measures at most budget x (1 - margin)."),
    refine: int = typer.Option(2, "--refine", min=0, help="After bisection, also measure this many shapes just above the boundary (catches non-monotone steps)."),
    repeats: int = typer.Option(50, "--repeats", min=1, help="Timed runs per candidate (after --warmup untimed runs)."),
    warmup: int = typer.Option(10, "--warmup", min=0, help="Untimed runs per candidate before timing."),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Timing passes per candidate; p50/p90 are the medians over passes (robust to bursts of load)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Measurement cache (JSON, keyed by machine fingerprint, settings and shape); default $HOMOEXPORT_CACHE/plan_cache.json or ~/.cache/homoexport/plan_cache.json."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Measure every visited candidate afresh and store nothing."),
    fresh: bool = typer.Option(False, "--fresh", help="Measure every visited candidate afresh and store the new figures in the cache "
                               "(cached figures are otherwise reused only when a calibration probe shows the machine at the same speed)."),
    measurements: Optional[Path] = typer.Option(None, "--measurements", help="Choose from a measurements.json written by `homoexport measure` on the target machine instead of measuring here."),
    export_candidates_dir: Optional[Path] = typer.Option(None, "--export-candidates", help="Instead of planning, write every candidate's deployed ONNX file + manifest.json to DIR, to time on the target with `homoexport measure DIR`."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the plan (chosen shape, predicted figures, every measured candidate, machine, settings) as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of the budgeted figure vs parameters with the budget line and the chosen shape."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the --export-candidates directory if it exists."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress."),
    ci: bool = typer.Option(os.environ.get("CI", "").lower() in ("1", "true", "yes"), "--ci/--no-ci",
                            help="CI mode (default: on when $CI is set): exit 8 when the machine stayed contended while measuring, "
                                 "instead of a warning."),
) -> None:
    """Choose the largest student shape of TEACHER whose cost, measured on this machine through onnxruntime on random-weight
    candidates exported exactly as `homoexport export` does, fits the budget. Bisects the candidates by size, measures a
    figure over the budget twice (keeping the faster), caches every measurement, never returns a shape over budget, and fails naming the smallest achievable figure when none fits."""
    _check_out(out)
    from homoexport.deployment.budget import (
        BudgetError,
        FigureSource,
        PlanSettings,
        SearchSpace,
        default_cache_path,
        export_candidates,
        parse_candidates,
        parse_depths,
        plan,
        teacher_shape,
    )
    from homoexport.distillation.models import quiet_transformers

    quiet_transformers()
    settings = PlanSettings(batch=batch, seq=seq, threads=threads, precision=precision, task=task, warmup=warmup, repeats=repeats, rounds=rounds)
    depths = parse_depths(layers)
    shapes = parse_candidates(candidates, teacher_shape(teacher), multiple, ffn_ratio, depths) if candidates else None
    space = SearchSpace(shapes, multiple, ffn_ratio, depths, margin, refine)
    from homoexport.cli.progress import StepProgress

    if export_candidates_dir is not None:
        with StepProgress("export candidates", console, enabled=progress) as bar:
            manifest = export_candidates(teacher, export_candidates_dir, settings, space, overwrite=overwrite, on_progress=bar.update)
        console.print(f"wrote {len(manifest['candidates'])} candidates to {export_candidates_dir}; on the target run "
                      f"`homoexport measure {export_candidates_dir}`, then `homoexport plan --measurements .../measurements.json`", highlight=False)
        return
    if budget is None:
        raise BudgetError("--budget is required (or --export-candidates DIR)")
    with StepProgress("plan", console, enabled=progress) as bar:
        source = FigureSource(cache_path=None if no_cache else cache or default_cache_path(), measurements=measurements, fresh=fresh)
        report = plan(teacher, budget, settings, space, source, out=out, plot=plot, on_progress=bar.update)
    from homoexport.cli.tables import depth_lines, plan_table
    from homoexport.deployment.bench import same_speed

    Console().print(plan_table(report))
    for line in depth_lines(report):
        console.print(line, highlight=False)
    c = report["chosen"]
    predicted = f"; predicted p50 {c['predicted']['p50_ms']:.2f} ms, file {c['predicted']['file_bytes'] / 2**20:.1f} MB" if c["predicted"] else ""
    console.print(f"chosen {c['name']} ({c['params'] / 1e6:.2f}M params){predicted}; {report['measured']} measured, "
                  f"{report['cache_hits']} from cache, {report['elapsed_s']:.0f}s", highlight=False)
    if report["cache"]["stale_remeasured"]:
        console.print(f"re-measured {len(report['cache']['stale_remeasured'])} cached figures taken at another machine speed", highlight=False)
    if report["rechecked"]:
        checks = ", ".join(f"{r['name']} {r['p50_ms'][0]:.2f}/{r['p50_ms'][1]:.2f} ms" for r in report["rechecked"])
        console.print(f"figures over the budget were measured twice, the faster kept: {checks}", highlight=False)
    speed = report.get("machine_speed") or {}
    if report["cache_hits"] and speed.get("probe_ms") and speed.get("quiet_probe_ms") and not same_speed(speed["probe_ms"], speed["quiet_probe_ms"]):
        console.print(f"the machine runs {speed['probe_ms'] / speed['quiet_probe_ms'] - 1:.0%} slower than its quiet speed now; the "
                      f"{report['cache_hits']} cached figures were taken at the quiet speed and were reused", highlight=False)
    if report["contended"]:
        message = (f"the machine was contended while measuring {', '.join(report['contended'])}: those figures are unreliable; "
                   "plan again on a quiet machine")
        if ci:
            from homoexport.errors import ContendedMachineError

            raise ContendedMachineError(message)
        console.print(f"[yellow]warning:[/] {message}", highlight=False)
    for path in [p for p in (out, plot) if p]:
        console.print(f"wrote {path}", highlight=False)


@app.command("measure")
def measure_command(
    directory: Path = typer.Argument(..., help="A directory written by `homoexport plan --export-candidates` (manifest.json + one folder per candidate)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="onnxruntime intra-op threads (default: the manifest's, else all physical cores here)."),
    rss: bool = typer.Option(True, "--rss/--no-rss", help="Also measure each session's peak RSS in a fresh process (needed for rss= budgets)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the measurements (default: DIRECTORY/measurements.json)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress."),
) -> None:
    """Time exported plan candidates on this machine (latency p50/p90, file size, session RSS). Needs only onnxruntime + numpy,
    so it runs on the edge device; feed the result to `homoexport plan --measurements`."""
    _check_out(out)
    from homoexport.cli.progress import StepProgress
    from homoexport.deployment.budget import measure_candidates

    with StepProgress("measure", console, enabled=progress) as bar:
        data = measure_candidates(directory, threads=threads, rss=rss, out=out, on_progress=bar.update)
    for row in data["candidates"]:
        m = row["measurement"]
        rss_text = f", rss {m['rss_mb']:.1f} MB" if m["rss_mb"] is not None else ""
        print(f"{row['name']}: p50 {m['p50_ms']:.2f} ms, p90 {m['p90_ms']:.2f} ms, file {m['file_bytes'] / 2**20:.1f} MB{rss_text}")
    console.print(f"wrote {out or directory / 'measurements.json'}", highlight=False)
