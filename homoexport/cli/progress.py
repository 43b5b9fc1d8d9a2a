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
        self.tasks: dict[str, object] = {}
        self.entered = time.time()

    def __enter__(self) -> "StepProgress":
        if self.enabled and self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(TextColumn("[bold]{task.fields[label]}"), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn(), BarColumn(bar_width=20), TextColumn("{task.fields[info]}"),
                                     console=self.console, transient=False)
            self.progress.start()
        return self

    def update(self, record: dict) -> None:
        if not self.enabled:
            return
        step, total, label = record["step"], record["total"], record.get("stage", self.label)
        if self.progress is not None:
            if label not in self.tasks:
                self.tasks[label] = self.progress.add_task(label, total=total, completed=step, info="", label=label)
            self.progress.update(self.tasks[label], completed=step, info=describe(record))
            return
        now = time.time()
        if label not in self.tasks:  # a new stage (or a resumed run): the rate counts from its first record
            self.tasks[label] = (step, now, self.entered if not self.tasks else now)
        first, first_at, started = self.tasks[label]
        elapsed = now - started
        if total:
            # The first record carries no rate yet (setup and a resume's skipped steps are not step time): "?"
            eta = _clock((now - first_at) / (step - first) * (total - step)) if step > first else "?"
            counters = f"{label} {step}/{total} elapsed {_clock(elapsed)} ETA {eta}"
        else:
            counters = f"{label} {step} elapsed {_clock(elapsed)}"
        self.console.print(f"{counters} | {describe(record)}", highlight=False, soft_wrap=True)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
