"""Logical KV-cache accounting: block ids and ref counts, no tensors (the model owns those)."""

from pacer.kv.block_pool import BlockPool
from pacer.kv.manager import KVCacheManager

__all__ = ["BlockPool", "KVCacheManager"]
