"""What a test does when something it needs is missing: skip on a developer's machine, fail in CI.

CI (`.ci/run`) sets PACER_TEST_STRICT=1: there the SmolLM2 wheel, the test extras, Ray and a compiler for the C++
kernels are all installed, so their absence is a broken environment, not a reason to skip. Only hardware a machine
may lack (CUDA, AVX-512 BF16, AVX2) stays a skip, with `pytest.skip` or `skipif` directly.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest

STRICT_ENV = "PACER_TEST_STRICT"


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "0") not in ("", "0")


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test, or under PACER_TEST_STRICT=1 fail it with the same reason."""
    if strict():
        pytest.fail(f"{reason} ({STRICT_ENV}=1: CI must have it; unset the variable to skip instead)", pytrace=False)
    pytest.skip(reason)


def import_or_skip(name: str) -> ModuleType:
    """`pytest.importorskip`, failing under PACER_TEST_STRICT=1."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        skip_or_fail(f"could not import {name!r}: {error}")


def kernel_ops(ops: object | None, what: str) -> object:
    """A kernel namespace from pacer.model.cpu_kernels, or skip/fail when it is unavailable. Kernels turned off on
    purpose (PACER_NO_CPP_KERNEL=1) always skip."""
    from pacer.model import cpu_kernels

    if ops is not None:
        return ops
    if not cpu_kernels.enabled():
        pytest.skip(f"{what}: turned off by {cpu_kernels.NO_KERNEL_ENV}")
    skip_or_fail(f"{what}: pacer's C++ kernels did not build (no compiler? see the warning logged by the build)")
