"""Mixed precision of the distillation loops: what ``training.precision: auto`` means on this machine, and
the autocast context the forward passes and losses run in.

bf16 autocast (torch.amp) runs matmuls in bfloat16 and keeps fp32 master weights, gradients and optimizer
state, so the saved student is fp32 either way. It pays only where the hardware multiplies bf16 natively:
CUDA GPUs that support it, and CPUs with AVX512-BF16 or AMX, where oneDNN's bf16 GEMM runs several times
faster than fp32; elsewhere bf16 is emulated and slower than fp32.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, ContextManager

import torch

logger = logging.getLogger(__name__)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 natively."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # torch exposes the CPU's bf16 capabilities only through these private probes (torch.cpu, 2.x); a torch
    # without them is treated as having none, which keeps such a machine on fp32.
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_precision(requested: str, device: torch.device) -> str:
    """``fp32`` or ``bf16``: ``auto`` is bf16 where ``device`` multiplies it natively, fp32 elsewhere."""
    if requested == "auto":
        if native_bf16(device):
            logger.info("training.precision auto: bf16 autocast, as this %s multiplies bf16 natively (set fp32 for full precision)", device.type)
            return "bf16"
        return "fp32"
    if requested == "bf16" and not native_bf16(device):
        logger.warning("training.precision bf16 on a %s without native bf16: it is emulated and slower than fp32", device.type)
    return requested


def precision_context(precision: str, device_type: str = "cpu") -> Callable[[], ContextManager]:
    """A factory of the context the forward passes and losses run in: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return lambda: torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext
