"""pacer's C++ kernels for CPU, built once per process on first use (torch's cpp_extension, cached on disk):

- `torch.ops.pacer_attention` (attention_cpu.cpp): paged decode attention, bf16 prefill attention (AVX-512 BF16)
  and KV writes;
- `torch.ops.pacer_layers` (layers_cpu.cpp): RMSNorm with the residual add fused in, and SiLU-and-mul;
- `torch.ops.pacer_quant` (quant_cpu.cpp): linear layers over GGUF's Q4_0/Q4_1/Q8_0 blocks.

All are one extension, so one build. Without a compiler, the callers fall back to plain torch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Set to 1 to skip building/using the C++ kernels (plain torch is used instead).
NO_KERNEL_ENV = "PACER_NO_CPP_KERNEL"
SOURCES = ("attention_cpu.cpp", "layers_cpu.cpp", "quant_cpu.cpp", "cpu_vec.h")


def enabled() -> bool:
    return os.environ.get(NO_KERNEL_ENV, "0") in ("", "0")


def load() -> bool:
    """Build (or load the cached build of) the kernels now, e.g. at engine start, rather than inside the first
    forward pass (a cold build takes ~15 s). False if they are disabled or unavailable."""
    return enabled() and _loader.get()


def revision() -> str:
    """A digest of the kernels' sources: what a latency profile measured with them is valid for."""
    digest = hashlib.sha1()
    for source in SOURCES:
        digest.update((Path(__file__).parent / source).read_bytes())
    return digest.hexdigest()[:10]


def attention_ops() -> object | None:
    return torch.ops.pacer_attention if _loader.get() else None


def layer_ops() -> object | None:
    """torch.ops.pacer_layers where the kernels are enabled and built, else None."""
    return torch.ops.pacer_layers if load() else None


def quant_ops() -> object | None:
    """torch.ops.pacer_quant where the kernels are enabled and built, else None."""
    return torch.ops.pacer_quant if load() else None


class _KernelLoader:
    """Builds the extension on first use, once per process, thread-safe. A failed build logs one warning and leaves
    plain torch in charge."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tried = False
        self._built = False

    def get(self) -> bool:
        if not self._tried:
            with self._lock:
                if not self._tried:
                    self._built = self._build()
                    self._tried = True
        return self._built

    @staticmethod
    def _build() -> bool:
        from torch.utils import cpp_extension

        here = Path(__file__).parent
        flags = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=fast", "-fopenmp"]
        try:
            cpp_extension.load(
                name=f"pacer_cpu_{_cpu_fingerprint()}",
                sources=[str(here / source) for source in SOURCES if source.endswith(".cpp")],
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
            )
            return True
        except Exception as e:  # noqa: BLE001 - any build failure means: use plain torch
            logger.warning("pacer's C++ CPU kernels unavailable, using plain torch: %s", e)
            return False


def _cpu_fingerprint() -> str:
    """-march=native builds are only valid on CPUs with the same features: key the cached build on them, so a cache
    directory shared between machines cannot hand out an illegal instruction."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor() or platform.machine()
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


_loader = _KernelLoader()
