"""Progress display for long runs: step / total / elapsed / ETA first, at any terminal width.

On a terminal a rich bar; otherwise (CI logs, ``| tee``) one plain line per logged record, so a log
shows progress while the run is going rather than one line at the end.
"""

from __future__ import annotations

import time

from rich.console import Console


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def describe(record: dict) -> str:
    """Message, loss, widths and dev metrics of one record, for the text after the counters."""
    parts = [record["message"]] if record.get("message") else []
    if record.get("loss") is not None:
        parts.append(f"loss {record['loss']:.4g}")
    w = record.get("widths")
    if w:
        parts.append(f"h{w['hidden']} a{w['heads']}x{w['head_dim']} f{w['ffn']}")
    if record.get("dev"):
        parts.append("dev " + " ".join(f"{k} {v:.2f}" for k, v in record["dev"].items()))
    return " | ".join(parts)


class StepProgress:
    """Context manager fed with log records that carry ``step`` and ``total``."""

    def __init__(self, label: str, console: Console, enabled: bool = True):
        self.label, self.console, self.enabled = label, console, enabled
        self.progress = None
        self.tasks: dict[str, object] = {}  # rich task ids by stage
        self.clocks: dict[str, tuple[int, float, float]] = {}  # by stage: first step seen, when, and when the stage began
        self.entered = time.time()

    def __enter__(self) -> "StepProgress":
        if self.enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            # The ETA is ours (eta() below), not rich's TimeRemainingColumn: rich estimates speed only from updates within
            # its last 30 s, and records come once per training.log_every steps, so it showed -:--:-- for minutes.
            self.progress = Progress(TextColumn("[bold]{task.fields[label]}"), MofNCompleteColumn(), TimeElapsedColumn(),
                                     TextColumn("ETA {task.fields[eta]}"), BarColumn(bar_width=20), TextColumn("{task.fields[info]}"),
                                     console=self.console, transient=False)
            self.progress.start()
        return self

    def eta(self, label: str, record: dict, now: float) -> str:
        """Time left at the rate since the stage's first record; before a second record, at the record's own step time
        (``step_s``) where it has one. Setup and a resume's skipped steps are not step time, so they never count."""
        first, first_at, _ = self.clocks[label]
        step, total = record["step"], record["total"]
        if step > first:
            return _clock((now - first_at) / (step - first) * (total - step))
        return _clock(record["step_s"] * (total - step)) if record.get("step_s") else "?"

    def update(self, record: dict) -> None:
        if not self.enabled:
            return
        step, total, label = record["step"], record["total"], record.get("stage", self.label)
        now = time.time()
        if label not in self.clocks:  # a new stage (or a resumed run): the rate counts from its first record
            self.clocks[label] = (step, now, self.entered if not self.clocks else now)
        if self.progress is not None:
            eta = self.eta(label, record, now) if total else "?"
            if label not in self.tasks:
                self.tasks[label] = self.progress.add_task(label, total=total, completed=step, info="", label=label, eta=eta)
            self.progress.update(self.tasks[label], completed=step, info=describe(record), eta=eta)
            return
        elapsed = now - self.clocks[label][2]
        if total:
            counters = f"{label} {step}/{total} elapsed {_clock(elapsed)} ETA {self.eta(label, record, now)}"
        else:
            counters = f"{label} {step} elapsed {_clock(elapsed)}"
        self.console.print(f"{counters} | {describe(record)}", highlight=False, soft_wrap=True)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
