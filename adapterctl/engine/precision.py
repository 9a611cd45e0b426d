"""Which precision a run uses, decided from what the hardware is, never from a timing.

``trainer.amp=auto`` resolves once per run: bf16 on CUDA devices with bf16 (fp16 on older ones), bf16 on CPUs
whose instruction set has bf16 dot products (AVX512-BF16 or AMX-BF16, and torch/oneDNN allowed to use them),
fp32 (``none``) elsewhere. The resolved value is written into the run's config and checkpoint; ``eval`` and
``predict`` use the checkpoint's precision unless told otherwise, so a run is evaluated as it was trained.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

import torch

from adapterctl.errors import ConfigError

AMP_CHOICES = ("auto", "bf16", "fp16", "none")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below the first one with bf16 dot products
_ONEDNN_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags known, so no bf16 claimed
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_fast_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 / AMX-BF16, x86).

    Honours the switches that make torch behave as an older CPU: ``ATEN_CPU_CAPABILITY`` below AVX512 and
    ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) below AVX512_CORE_BF16. Without bf16 units, torch's bf16
    matmul is emulated and about 100x slower than fp32.
    """
    flags = _cpu_flags() if flags is None else flags
    if not flags & {"avx512_bf16", "amx_bf16"}:
        return False
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return isa not in _ONEDNN_WITHOUT_BF16


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` / ``fp16`` / ``none`` for ``device``; explicit choices are checked and kept."""
    if amp not in AMP_CHOICES:
        raise ConfigError(f"trainer.amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if amp == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "none"
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("trainer.amp=fp16 needs a CUDA device (on CPU use trainer.amp=auto, bf16 or none)")
    return amp


def checkpoint_precision(config: dict) -> str:
    """The precision a checkpoint was trained in. Files from before precision was recorded, and converted
    official checkpoints (evaluated in fp32 by the official code), say ``auto``: fp32 (``none``) for them."""
    amp = str((config.get("trainer") or {}).get("amp", "auto"))
    return amp if amp in ("bf16", "fp16", "none") else "none"


def runnable_precision(amp: str, device: torch.device) -> tuple[str, str | None]:
    """A checkpoint's precision where this device can run it; else this device's ``auto`` choice and a note
    saying so (an fp16 run, trained on GPUs, evaluated or resumed on a CPU)."""
    if amp == "fp16" and device.type != "cuda":
        chosen = resolve_amp("auto", device)
        return chosen, f"the checkpoint was trained in fp16, which needs CUDA; using {chosen} here"
    return resolve_amp(amp, device), None


def autocast_context(device: torch.device, amp: str):
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if amp == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return nullcontext()
