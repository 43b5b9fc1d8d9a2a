"""Machine fingerprint: what a measurement was taken on, so results are only compared like with like.

Deliberately importable without torch: ``homoexport bench``/``measure`` run on edge boxes that have
only onnxruntime and numpy.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
from functools import lru_cache
from typing import Any

# The packages whose versions change numbers this tool reports.
TRACKED_PACKAGES = ("homoexport", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "datasets", "accelerate", "numpy")

# ISA flags that decide which int8 kernels onnxruntime can use.
ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "asimddp", "neon")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that influence results (None when not installed)."""
    out: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "features"):
                    flags.update(value.split())
    except OSError:
        pass
    return model, flags


def physical_cores() -> int:
    """Physical core count (falls back to logical CPUs available to this process)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return min(n, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else n
    except ImportError:
        pass
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """CPU model, ISA flags relevant to inference, and core counts."""
    model, flags = _cpuinfo()
    return {
        "cpu_model": model,
        "arch": platform.machine(),
        "isa": sorted(f for f in ISA_FLAGS if f in flags),
        "physical_cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
    }


def fingerprint() -> dict[str, Any]:
    """Everything that identifies the measuring machine and software, plus a short stable id.

    The id hashes the hardware and the onnxruntime version only: two runs with the same id are
    comparable latency-wise even if, say, the torch version differs.
    """
    cpu = cpu_info()
    versions = package_versions()
    ident = {k: cpu[k] for k in ("cpu_model", "arch", "isa", "physical_cores")} | {"onnxruntime": versions.get("onnxruntime")}
    digest = hashlib.sha256(repr(sorted(ident.items())).encode()).hexdigest()[:12]
    return {
        "id": digest,
        **cpu,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": versions,
    }
