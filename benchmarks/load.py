"""A second process that keeps one core busy: the "another job on the machine" of the load scenarios."""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator

_SPIN = "while True:\n    pass\n"
# Copies a 64 MB array over and over on one core: little arithmetic, all memory traffic.
_STREAM = "import numpy as np\na = np.ones(8_000_000)\nb = np.empty_like(a)\nwhile True:\n    np.copyto(b, a)\n"


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


@contextmanager
def memory_streaming(enabled: bool = True) -> Iterator[None]:
    """Run a numpy copy loop (one core, saturating memory bandwidth and the shared cache) for the duration of the block."""
    if not enabled:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", _STREAM])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()
