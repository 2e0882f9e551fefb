"""pacer: an LLM inference server that keeps its latency promises.

Public API: LLM, SamplingParams, EngineConfig. `LLM` is imported lazily so that the scheduling,
KV and simulation packages stay importable (and testable) without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pacer.config import EngineConfig
from pacer.request import SamplingParams

if TYPE_CHECKING:
    from pacer.llm import LLM

__all__ = ["LLM", "EngineConfig", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from pacer.llm import LLM
        return LLM
    raise AttributeError(f"module 'pacer' has no attribute {name!r}")
