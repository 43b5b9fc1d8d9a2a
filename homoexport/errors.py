"""The errors homoexport raises for conditions a user can act on, each with its command-line exit code.

The CLI turns a :class:`HomoexportError` into one line and its exit code; anything else is a bug and
keeps its traceback. Each class also derives from the built-in it refines (``ValueError``,
``FileNotFoundError``, ...) so library callers can catch either.

| exit | meaning |
|---|---|
| 0 | success |
| 1 | regression: ``bench --compare`` found a slower or less accurate model |
| 2 | bad input: an option, recipe, data file or model that cannot be used |
| 3 | ``bench --compare``: an entry of the baseline is missing from this run |
| 4 | ``bench --compare``: the baseline comes from another machine (latency not compared) |
| 5 | an output cannot be written (permissions, a file in the way, disk full) |
| 6 | a check failed: masked vs materialised parity, ONNX vs PyTorch parity, int8 accuracy gate, export failure |
| 7 | no student shape fits the budget; or ``distill`` finished (everything written) but missed it: no student within ``accuracy-drop``, or the shipped int8 file over the latency budget |
| 8 | the machine stayed contended while measuring (``plan`` in CI mode): the figures are unreliable |
"""

from __future__ import annotations

EXIT_REGRESSION = 1
EXIT_USAGE = 2
EXIT_MISSING = 3
EXIT_MACHINE = 4
EXIT_OUTPUT = 5
EXIT_CHECK = 6
EXIT_BUDGET = 7
EXIT_CONTENDED = 8


class HomoexportError(Exception):
    """Base class: a condition the user can act on; ``exit_code`` is what the CLI exits with."""

    exit_code = EXIT_USAGE


class UsageError(HomoexportError, ValueError):
    """Bad input: an option, a recipe value, a data file or a model that cannot be used as given."""


class InputNotFoundError(UsageError, FileNotFoundError):
    """An input file or directory does not exist."""


class OutputExistsError(UsageError, FileExistsError):
    """An output is already there and replacing it was not asked for."""


class OutputError(HomoexportError, OSError):
    """An output cannot be written (permission denied, a file where a directory must go, disk full)."""

    exit_code = EXIT_OUTPUT


class CheckError(HomoexportError, RuntimeError):
    """A correctness or accuracy check failed; nothing was written."""

    exit_code = EXIT_CHECK


class ParityError(CheckError):
    """Two computations that must agree (masked vs materialised student, ONNX vs PyTorch) differ."""


class RegressionError(HomoexportError):
    """A gated figure (accuracy, STS, latency) moved beyond its allowed limit."""

    exit_code = EXIT_REGRESSION


class ContendedMachineError(HomoexportError):
    """Measurements were taken while something else competed for the cores, and stayed so when repeated."""

    exit_code = EXIT_CONTENDED
