"""Checkpoints and resume, shared by every training loop: atomic saves, RNG state, and the rule that a
run resumes only under the recipe it was started with.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from homoexport import __version__
from homoexport.config.recipe import Recipe
from homoexport.errors import OutputExistsError, UsageError
from homoexport.machine import fingerprint


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainingClock:
    """A run's training seconds across the processes that trained it, so that a resumed run reports the whole run.

    Checkpoints carry ``elapsed()``; the steps a killed process did after its last checkpoint are redone, and only
    the redoing counts. ``before`` is None for a checkpoint written before checkpoints kept it: the report then
    counts from ``from_step``.
    """

    before: float | None = 0.0
    from_step: int = 0
    started: float = field(default_factory=time.time)

    def since_start(self) -> float:
        return time.time() - self.started

    def elapsed(self) -> float | None:
        return None if self.before is None else self.before + self.since_start()

    def report(self) -> dict[str, Any]:
        """``wall_time_s`` (the whole run's training, or from ``wall_time_from_step`` where that is unknown) and, for a
        resumed run, the seconds this process trained."""
        elapsed, since = self.elapsed(), self.since_start()
        return {"wall_time_s": round(since if elapsed is None else elapsed, 2),
                "wall_time_from_step": self.from_step if elapsed is None else 0,
                "wall_time_s_since_resume": round(since, 2) if self.from_step else None}


def check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a run into a non-empty directory unless it resumes or replaces it (checked before any work)."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other: give one")
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise OutputExistsError(f"output directory {out} is not empty: pass --resume to continue that run or --overwrite to replace it")


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint file in ``directory`` (partial writes never have the final name)."""
    found = sorted(directory.glob("step-*.pt"))
    return found[-1] if found else None


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary name, fsync, then rename: a kill leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# Training keys a resumed run may change: where outputs go and how often it logs or saves, not what it computes.
# ``precision`` is checked apart (check_same_precision).
_NOT_RESUMABLE = ("keep_checkpoints", "snapshot_every", "precision", "log_every", "checkpoint_every")


def resumable_fields(recipe: Recipe) -> dict[str, Any]:
    """What must not change between a checkpoint and its resume (everything but the output location).

    ``training.precision`` is left out: what must match is the precision it resolved to, which the checkpoint keeps
    (see check_same_precision), so ``auto`` and the precision it chose are the same run. So is
    ``pruning.materialize_at``: where the loop goes on over a materialised student changes what a step costs, not what
    it computes (the two agree to PARITY_TOLERANCE, checked at every switch).
    """
    exclude: dict[str, Any] = {"output": True, "training": set(_NOT_RESUMABLE), "pruning": {"materialize_at"}}
    if recipe.task is not None:  # how the finished student is exported changes nothing trained
        exclude["task"] = {"keep_fp32"}
    return recipe.model_dump(mode="json", exclude=exclude)



def check_same_recipe(saved: dict[str, Any], recipe: Recipe, ckpt: Path) -> None:
    """Refuse to resume under a different recipe: the result would be neither run."""
    current = resumable_fields(recipe)
    saved = {**saved, "training": {k: v for k, v in saved.get("training", {}).items() if k not in _NOT_RESUMABLE}}
    if "materialize" not in saved.get("pruning", {}):  # written before pruning.materialize: a task run kept it under task
        task = dict(saved["task"]) if saved.get("task") else None
        materialize = task.pop("materialize", True) if task is not None else False  # the task-agnostic loop stayed masked
        saved = {**saved, "task": task, "pruning": {**saved.get("pruning", {}), "materialize": materialize}}
    if saved.get("task") and "keep_best" not in saved["task"]:  # written before task.keep_best: the last student was kept
        saved = {**saved, "task": {**saved["task"], "keep_best": False}}
    if saved != current:
        diff = sorted(_differing_keys(saved, current))
        changes = ", ".join(f"{key}: {_value_at(saved, key)!r} then, {_value_at(current, key)!r} now" for key in diff[:8])
        resolved = ckpt.parent.parent / "recipe.resolved.yaml" if ckpt.parent.name == "checkpoints" else None
        hint = f" (`homoexport distill {resolved} --out {resolved.parent} --resume` resumes it as it was)" if resolved and resolved.is_file() else ""
        raise UsageError(f"cannot resume from {ckpt}: the recipe changed since it was written ({changes}); restore those values{hint} "
                         "or start over with --overwrite")


def check_same_precision(saved: str | None, precision: str, requested: str, ckpt: Path) -> None:
    """Refuse to resume at another precision than the checkpoint's: ``auto`` resolves per machine (bf16 where native)."""
    if saved is not None and saved != precision:
        raise UsageError(f"cannot resume from {ckpt}: it was trained in {saved}, and training.precision {requested} is {precision} on "
                         f"this machine; pass --set training.precision={saved} to resume it as it was trained")


def finished_report(run_dir: Path, recipe: Recipe) -> dict[str, Any] | None:
    """The report of a run in ``run_dir`` that already finished under this same recipe, else None.

    A finished run under another recipe is an error: resuming it would be neither run.
    """
    report, resolved = run_dir / "report.json", run_dir / "recipe.resolved.yaml"
    if not (report.is_file() and (run_dir / "student").is_dir() and resolved.is_file()):
        return None
    import yaml

    from homoexport.config.recipe import validate_recipe

    check_same_recipe(resumable_fields(validate_recipe(yaml.safe_load(resolved.read_text()))), recipe, resolved)
    return json.loads(report.read_text())


def finished_keep_fp32(run_dir: Path) -> list[str]:
    """The ``task.keep_fp32`` a finished run's files were exported with (its resolved recipe): a resume under another
    one exports them again, since it changes nothing trained (:func:`resumable_fields`)."""
    import yaml

    task = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text()).get("task") or {}
    return list(task.get("keep_fp32") or [])


def _value_at(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in a.keys() | b.keys() for k in _differing_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def resolved_header() -> str:
    fp = fingerprint()
    versions = ", ".join(f"{k} {v}" for k, v in fp["versions"].items() if v)
    return (f"# Resolved by homoexport {__version__}; loadable as a recipe.\n# versions: {versions}\n"
            f"# machine: {fp['cpu_model']} ({fp['arch']}, {fp['physical_cores']} cores, isa {' '.join(fp['isa'])}), id {fp['id']}\n")
