"""The error contract: bad input is one line with its exit code, a bug keeps its traceback, outputs are
checked before work, and staging directories of dead processes are cleaned up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import save_model_dir
from typer.testing import CliRunner

from homoexport import errors
from homoexport.atomic import remove_stale_staging, staging_dir
from homoexport.cli import app


def test_every_error_class_has_its_documented_exit_code():
    assert errors.UsageError("x").exit_code == errors.EXIT_USAGE == 2
    assert errors.OutputError("x").exit_code == errors.EXIT_OUTPUT == 5
    assert errors.ParityError("x").exit_code == errors.EXIT_CHECK == 6
    from homoexport.deployment.budget import NoFitError
    from homoexport.deployment.export import ExportError, ExportInputError

    assert NoFitError("x").exit_code == errors.EXIT_BUDGET == 7
    assert ExportError("x").exit_code == 6 and ExportInputError("x").exit_code == 2
    assert isinstance(errors.InputNotFoundError("x"), FileNotFoundError) and isinstance(errors.UsageError("x"), ValueError)


def test_bad_input_is_one_line_with_exit_code(tmp_path: Path):
    model = save_model_dir(tmp_path / "m", kind="base")
    result = CliRunner().invoke(app, ["prune", str(model), "--hidden", "30", "--heads", "4", "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and result.output.startswith("error:") and "Traceback" not in result.output
    assert not (tmp_path / "p").exists()


def test_a_bug_keeps_its_traceback(tmp_path: Path, monkeypatch):
    """An exception outside the HomoexportError hierarchy (here a RuntimeError from inside torch) is not
    turned into a one-line 'bad input' message."""
    import homoexport.pruning.oneshot as prune

    def broken(*args, **kwargs):
        raise RuntimeError("simulated torch kernel failure")

    monkeypatch.setattr(prune, "prune_model", broken)
    model = save_model_dir(tmp_path / "m", kind="base")
    result = CliRunner().invoke(app, ["prune", str(model), "--hidden", "32", "--out", str(tmp_path / "p")])
    assert isinstance(result.exception, RuntimeError) and "simulated torch kernel failure" in str(result.exception)
    assert result.exit_code == 1 and "error:" not in result.output


def test_a_bug_prints_a_traceback_from_the_real_entry_point(tmp_path: Path):
    code = ("import sys, homoexport.pruning.oneshot as p\n"
            "def broken(*a, **k): raise RuntimeError('simulated torch kernel failure')\n"
            "p.prune_model = broken\n"
            "from homoexport.cli import app\n"
            f"sys.argv = ['homoexport', 'prune', {str(tmp_path / 'm')!r}, '--hidden', '32', '--out', {str(tmp_path / 'p')!r}]\n"
            "app()\n")
    save_model_dir(tmp_path / "m", kind="base")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "simulated torch kernel failure" in proc.stderr


def test_unwritable_out_fails_before_work_with_exit_5(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    model = save_model_dir(tmp_path / "m", kind="base")
    for argv in (["prune", str(model), "--hidden", "32", "--out", str(blocker / "p")],
                 ["export", str(model), "--onnx", "--out", str(blocker / "e")],
                 ["report", str(tmp_path), "--out", str(blocker / "r")]):
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 5, (argv, result.output)
        assert "cannot write" in result.output and "Traceback" not in result.output


def test_stale_staging_of_dead_processes_is_removed_and_live_ones_kept(tmp_path: Path):
    final = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".out.{dead}.abc123.partial"
    live = tmp_path / f".out.{os.getppid()}.def456.partial"
    legacy = tmp_path / ".out.xyz.partial"
    for d in (stale, live, legacy):
        (d / "sub").mkdir(parents=True)
    assert remove_stale_staging(final) == [stale]
    assert live.exists() and legacy.exists() and not stale.exists()
    with staging_dir(final) as tmp:
        assert tmp.name.startswith(f".out.{os.getpid()}.")
        (tmp / "f").write_text("x")
    assert (final / "f").read_text() == "x"


def test_killed_writer_leaves_staging_that_the_next_run_removes(tmp_path: Path):
    code = ("import os, time\nfrom homoexport.atomic import staging_dir\n"
            f"with staging_dir({str(tmp_path / 'out')!r}) as t:\n    open(os.path.join(t, 'x'), 'w').write('1'); print(t, flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    staged = Path(proc.stdout.readline().strip())
    assert staged.exists()
    proc.kill()
    proc.wait()
    with staging_dir(tmp_path / "out"):
        pass
    assert not staged.exists() and (tmp_path / "out").is_dir()


@pytest.mark.parametrize("code", [errors.EXIT_USAGE, errors.EXIT_OUTPUT, errors.EXIT_CHECK, errors.EXIT_BUDGET, errors.EXIT_CONTENDED])
def test_exit_codes_are_in_the_readme(code):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"| {code} |" in readme


def test_missing_inputs_are_named_before_heavy_imports(tmp_path: Path):
    """A missing recipe or model directory is reported in well under the seconds torch and optimum take to import."""
    import time

    for argv in (["distill", str(tmp_path / "none.yaml")], ["export", str(tmp_path / "none"), "--onnx", "--out", str(tmp_path / "e")],
                 ["glue", str(tmp_path / "none"), "--task", "sst2", "--data-dir", str(tmp_path), "--out", str(tmp_path / "g")]):
        code = ("import sys, time\nt = time.time()\nfrom homoexport.cli import app\n"
                f"sys.argv = ['homoexport', *{argv!r}]\n"
                "try:\n    app()\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules, round(time.time() - t, 2))\n")
        started = time.time()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        exit_code, torch_loaded, _ = out.stdout.split()
        assert exit_code == "2" and torch_loaded == "False", (argv, out.stdout, out.stderr)
        assert "error:" in out.stderr and time.time() - started < 60


def test_progress_prints_counters_first_as_plain_lines_when_not_a_terminal():
    import io

    from rich.console import Console

    from homoexport.cli.progress import StepProgress

    buffer = io.StringIO()
    console = Console(file=buffer, width=40, force_terminal=False)
    with StepProgress("distill", console) as bar:
        for step in (10, 20):
            bar.update({"step": step, "total": 240, "loss": 0.5, "widths": {"hidden": 192, "heads": 6, "head_dim": 32, "ffn": 768}})
        bar.update({"stage": "plan", "step": 1, "total": None, "message": "measuring h192"})
    lines = buffer.getvalue().splitlines()
    assert lines[0].startswith("distill 10/240 elapsed 0:00:00 ETA ?") and lines[1].startswith("distill 20/240 elapsed")
    assert "ETA ?" not in lines[1]  # from the second record on, the ETA comes from the measured rate
    assert "loss 0.5" in lines[0] and "h192 a6x32 f768" in lines[0]  # the details follow the counters, not the reverse
    assert lines[2].startswith("plan 1 elapsed") and "measuring h192" in lines[2]
    buffer = io.StringIO()
    with StepProgress("distill", Console(file=buffer, width=40, force_terminal=False)) as bar:
        bar.update({"step": 20, "total": 240, "step_s": 0.5})  # a record with its step time has an ETA from the first line on
    assert buffer.getvalue().startswith("distill 20/240 elapsed 0:00:00 ETA 0:01:50")


def test_progress_bar_on_a_terminal_shows_the_eta_from_the_first_record():
    import io

    from rich.console import Console

    from homoexport.cli.progress import StepProgress

    buffer = io.StringIO()
    with StepProgress("distill", Console(file=buffer, width=160, force_terminal=True)) as bar:
        bar.update({"step": 20, "total": 240, "step_s": 0.5, "loss": 0.5})
        bar.progress.refresh()
    assert "ETA 0:01:50" in buffer.getvalue() and "20/240" in buffer.getvalue()


def test_plan_in_ci_mode_exits_8_on_a_contended_machine(tmp_path: Path, monkeypatch):
    import homoexport.deployment.budget as budget

    teacher = save_model_dir(tmp_path / "t", kind="base")
    chosen = {"name": "h32-a2-f64-l2", "hidden": 32, "heads": 2, "ffn": 64, "layers": 2, "params": 1000, "backbone_params": 600,
              "predicted": {"p50_ms": 1.0, "p90_ms": 1.2, "file_bytes": 1 << 20, "rss_mb": None, "source": "measured", "probe_ms": 8.0,
                            "contended": True}}
    fake = {"budget": "latency=8ms", "statistic": "p50_ms", "margin": 0.05, "constraints": [],
            "settings": {"batch": 1, "seq": 128, "threads_resolved": 2, "precision": "int8"},
            "candidates": [{**chosen, "measurement": chosen["predicted"], "fits": True}], "chosen": chosen, "measured": 1, "cache_hits": 0,
            "rechecked": [{"name": "h48-a2-f96-l2", "p50_ms": [9.5, 8.9]}],
            "cache": {"reused": [], "stale_remeasured": [], "fresh": False}, "contended": [chosen["name"]], "elapsed_s": 1.0}
    monkeypatch.setattr(budget, "plan", lambda *a, **k: fake)
    ci = CliRunner().invoke(app, ["plan", "--teacher", str(teacher), "--budget", "latency=8ms", "--no-cache", "--ci"])
    assert ci.exit_code == errors.EXIT_CONTENDED == 8 and "contended" in ci.output
    local = CliRunner().invoke(app, ["plan", "--teacher", str(teacher), "--budget", "latency=8ms", "--no-cache", "--no-ci"])
    assert local.exit_code == 0 and "warning" in local.output
    assert "measured twice, the faster kept: h48-a2-f96-l2 9.50/8.90 ms" in " ".join(local.output.split())


def test_cli_log_lines_appear_once_when_another_library_logs_through_the_root():
    # onnxruntime's quantizer calls logging.info() on the root logger, which configures a default root handler
    # when none exists; homoexport's lines must still be printed once, other libraries' warnings still shown.
    script = (
        "import logging, sys\n"
        "from rich.console import Console\n"
        "from homoexport.cli.app import _log_to\n"
        "_log_to(Console(file=sys.stdout, width=200))\n"
        "logging.info('quantizer detail')\n"
        "logging.warning('third-party warning')\n"
        "logging.getLogger('homoexport.evaluation.glue').info('scoring the student')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    out = proc.stdout + proc.stderr
    assert out.count("scoring the student") == 1
    assert out.count("third-party warning") == 1
    assert "quantizer detail" not in out
