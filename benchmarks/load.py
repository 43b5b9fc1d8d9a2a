"""Second processes that load the machine during a scenario: a spinning core, or a core streaming memory."""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator

_SPIN = "while True:\n    pass\n"
# Copies a 64 MB array over and over on one core: little arithmetic, all memory traffic.
_STREAM = "import numpy as np\na = np.ones(8_000_000)\nb = np.empty_like(a)\nwhile True:\n    np.copyto(b, a)\n"


@contextmanager
def _in_background(code: str, enabled: bool) -> Iterator[None]:
    """Run ``python -c code`` in a second process for the duration of the block (nothing when not ``enabled``)."""
    if not enabled:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def one_core_busy(enabled: bool = True):
    """Run a pure-Python spin loop (one core, no memory traffic) for the duration of the block."""
    return _in_background(_SPIN, enabled)


def memory_streaming(enabled: bool = True):
    """Run a numpy copy loop (one core, saturating memory bandwidth and the shared cache) for the duration of the block."""
    return _in_background(_STREAM, enabled)
