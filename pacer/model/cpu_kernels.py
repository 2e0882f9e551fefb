"""pacer's C++ kernels for CPU, built once per process on first use (torch's cpp_extension, cached on disk):

- `torch.ops.pacer_attention` (attention_cpu.cpp): paged decode attention, bf16 prefill attention (AVX-512 BF16)
  and KV writes;
- `torch.ops.pacer_layers` (layers_cpu.cpp): RMSNorm with the residual add fused in, and SiLU-and-mul;
- `torch.ops.pacer_quant` (quant_cpu.cpp): linear layers over GGUF's Q4_0/Q4_1/Q8_0 blocks.

All are one extension, so one build. Without a compiler, the callers fall back to plain torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Set to 1 to skip building/using the C++ kernels (plain torch is used instead).
NO_KERNEL_ENV = "PACER_NO_CPP_KERNEL"
# What running without them costs, for the one warning that says so.
FALLBACK_COST = ("decode attention, the fused norms and the matmuls on GGUF blocks fall back to plain torch, several "
                 "times slower a step")
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
            build_dir = build_directory()
            with _exclusive(build_dir):
                cpp_extension.load(
                    name=build_dir.name,
                    sources=[str(here / source) for source in SOURCES if source.endswith(".cpp")],
                    extra_cflags=flags,
                    extra_ldflags=["-fopenmp"],
                    build_directory=str(build_dir),
                    is_python_module=False,
                )
            return True
        except Exception as e:  # noqa: BLE001 - any build failure means: use plain torch
            logger.warning("pacer's C++ kernels are unavailable (their build failed: %s): %s. A C++ compiler (g++ or "
                           "clang++) and ninja build them at the next start", e, FALLBACK_COST)
            return False


def build_directory() -> Path:
    """Where the extension is built and cached: torch's extensions root (TORCH_EXTENSIONS_DIR, else
    ~/.cache/torch_extensions), then a folder per CPU, torch, Python and checkout. Not torch's default folder, which
    keys on the Python version and accelerator only: -march=native builds run only on CPUs with the same features,
    and two checkouts in one folder rebuild each other's build at every start (its ninja file names the sources by
    absolute path)."""
    from torch.utils import cpp_extension

    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor() or platform.machine()
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    key = "\n".join([flags, torch.__version__, python, str(Path(__file__).parent)])
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / "pacer" / f"pacer_cpu_{hashlib.sha1(key.encode()).hexdigest()[:10]}"


@contextlib.contextmanager
def _exclusive(build_dir: Path) -> Iterator[None]:
    """Hold pacer's own lock on `build_dir` while torch builds or loads there.

    torch guards a build with a `lock` file (FileBaton) that only a clean exit removes: a build killed half-way (a
    SIGKILL, a SIGTERM, a closed terminal) leaves it, and every later start then waits for it forever, even to load
    a finished build. Ours is an flock, which the kernel drops when its holder dies however it dies; holding it, no
    live pacer uses `build_dir`, so a `lock` there is stale and goes.
    """
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no flock, and torch's lock file as it is
        yield
        return
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "pacer.flock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process building pacer's C++ kernels in %s", build_dir)
            fcntl.flock(handle, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            logger.warning("removing %s, left by a build of pacer's C++ kernels that was killed", stale)
            stale.unlink(missing_ok=True)
        yield  # the flock goes with the file's close


_loader = _KernelLoader()
