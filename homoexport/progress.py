"""Progress of long library calls as plain records, so the library never draws anything itself.

A long call takes ``on_progress``, a callable that receives dicts with ``stage`` (what is running),
``step`` and ``total`` (``total`` None when unknown) and optional ``message``; None means silence.
The CLI turns them into a progress display (``homoexport.cli.progress``); a notebook can pass
``print`` or collect them.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

ProgressFn = Callable[[dict], None]


class Tracker:
    """Counts the steps of one stage and reports each change to ``on_progress`` (no-op when None)."""

    def __init__(self, on_progress: Optional[ProgressFn], stage: str, total: int | None = None):
        self.on_progress, self.stage, self.total, self.step = on_progress, stage, total, 0

    def _emit(self, message: str | None, **fields: Any) -> None:
        if self.on_progress is not None:
            self.on_progress({"stage": self.stage, "step": self.step, "total": self.total, "message": message, **fields})

    def advance(self, n: int = 1, message: str | None = None, **fields: Any) -> None:
        self.step += n
        self._emit(message, **fields)

    def note(self, message: str, **fields: Any) -> None:
        """Report what is happening now without counting a step."""
        self._emit(message, **fields)
