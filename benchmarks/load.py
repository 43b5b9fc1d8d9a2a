"""A second process that keeps one core busy: the "another job on the machine" of the load scenarios."""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator

_SPIN = "while True:\n    pass\n"


@contextmanager
def one_core_busy(enabled: bool = True) -> Iterator[None]:
    """Run a pure-Python spin loop (one core, no memory traffic) for the duration of the block."""
    if not enabled:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", _SPIN])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()
