"""Architecture hyper-parameters of a Llama-like checkpoint: Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3 (SmolLM2 is a
Llama). The families differ by a few switches, not by their code: biases on q/k/v (Qwen2), an RMSNorm on each head of
q and k (Qwen3), scaled RoPE frequencies (Llama 3.1+), a sliding attention window (Mistral v0.1)."""

from __future__ import annotations

from dataclasses import dataclass

# The families one LlamaModel serves, by the name their configs and GGUFs give them.
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class LlamaConfig:
    """What the forward pass needs to know about the network's shape."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    architecture: str = "llama"  # one of ARCHITECTURES: names the family in /v1/models and the profile cache
    attention_bias: bool = False  # q/k/v projections have biases (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    # RoPE's inverse frequencies are divided by these, one per rotated pair (head_dim / 2): Llama 3.1's `llama3` and
    # `linear` scaling both come down to this, and a Llama 3.1 GGUF stores them as its `rope_freqs` tensor.
    rope_freq_factors: tuple[float, ...] | None = None
    sliding_window: int | None = None  # attention sees only this many tokens back (Mistral v0.1); None: all

    @property
    def max_context_len(self) -> int:
        """The longest context pacer serves: attention is full causal, so a sliding window caps it (within the window
        the two attend the same)."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r} is not supported; supported: {ARCHITECTURES}")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ValueError(f"rope_freq_factors has {len(self.rope_freq_factors)} factors, head_dim {self.head_dim} "
                             f"rotates {self.head_dim // 2} pairs")
