"""GPU latency profiles for the simulator, built from published measurements (benchmarks/data/profiles), and
the KV capacity a model leaves on a GPU. Each becomes a `LinearLatencyModel`, the same kind `pacer profile`
writes, so the scheduler plans with it exactly as it would with a measured one (docs/profiles.md).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from pacer.latency.model import BatchShape, LinearLatencyModel, feature_names


@dataclass(frozen=True)
class ModelShape:
    """What sizes a model's weights and KV cache (from its Hugging Face config.json)."""

    name: str
    num_params: float
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2  # fp16 / bf16

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes  # K and V

    @property
    def weight_bytes(self) -> float:
        return self.num_params * self.dtype_bytes


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: float
    memory_bandwidth: float  # bytes/s


A100_80GB = GPU("A100-80GB", 80e9, 1.935e12)  # PCIe datasheet: 80 GB HBM2e, 1,935 GB/s
MODELS = {m.name: m for m in (
    ModelShape("01-ai/Yi-34B", 34.39e9, 60, 8, 128),  # GQA: 56 query heads, 8 KV heads
    ModelShape("facebook/opt-13b", 12.85e9, 40, 40, 128),
    ModelShape("facebook/opt-66b", 65.7e9, 64, 72, 128),
    ModelShape("facebook/opt-175b", 175e9, 96, 96, 128),
)}


def model_shape(latency: LinearLatencyModel) -> ModelShape:
    """The model a GPU profile was measured with (its key names it): what sizes a KV transfer."""
    name = latency.key.get("model")
    if name not in MODELS:
        raise ValueError(f"the profile's model {name!r} has no known shape (known: {', '.join(MODELS)}): "
                         "disaggregation needs a GPU profile to size the KV it moves")
    return MODELS[name]


def kv_capacity_tokens(model: ModelShape, gpu: GPU, tensor_parallel: int, memory_utilization: float = 0.9) -> int:
    """Tokens of KV cache that fit once the weights are loaded: the usable memory of `tensor_parallel` GPUs (vLLM's
    gpu_memory_utilization) less the weights, over the KV bytes per token. Activations are not reserved, as in
    DistServe's own table (`max_num_tokens.csv`), which this matches within a few percent at utilization 1."""
    free = tensor_parallel * gpu.memory_bytes * memory_utilization - model.weight_bytes
    if free <= 0:
        raise ValueError(f"{model.name} does not fit on {tensor_parallel} x {gpu.name}")
    return int(free // model.kv_bytes_per_token)


@dataclass
class GPUProfile:
    """A latency model for one model on one GPU setup, and the KV capacity it has there."""

    latency: LinearLatencyModel
    kv_capacity_tokens: int


SARATHI_KNOTS = (8, 128, 1024)  # where the decode and prefill curves of the Yi-34B data bend


def sarathi_a100_profile(directory: Path, memory_utilization: float = 0.9) -> GPUProfile:
    """Yi-34B, tensor parallel 2 on A100-80GB PCIe, from Sarathi-Serve's artifact (OSDI'24, `osdi-experiments/`).

    Fitted on the decode-only batches (figure 2), the prefills (figure 2; the 256-token point is left out: it
    takes longer than the 512-token one, a measurement artefact), the hybrid batches (table 2) and, as totals
    of several iterations, the chunked prefills (figure 9), so that chunks after a long context are right.
    The data does not vary the decode context, so its cost is the time to read the KV from HBM.
    """
    directory = Path(directory)
    shapes, times = [], []
    for row in _rows(directory / "figure-2_decode.csv"):
        shapes.append(_decodes(BatchShape(), int(float(row["batch_size"])), 0))
        times.append(float(row["batch_execution_time"]))
    for row in _rows(directory / "figure-2_prefill.csv"):
        tokens = int(float(row["batch_num_prefill_tokens"]))
        if tokens != 256:
            shapes.append(BatchShape().with_chunk(tokens, 0))
            times.append(float(row["batch_execution_time"]))
    for row in _rows(directory / "table-2_results.csv"):
        prefill = int(float(row["batch_num_prefill_tokens"]))
        shape = BatchShape().with_chunk(prefill, 0) if prefill else BatchShape()
        shapes.append(_decodes(shape, int(float(row["batch_num_decode_tokens"])), 0))
        times.append(float(row["batch_execution_time"]) / 1e3)  # this table is in ms
    runs = []
    for row in _rows(directory / "figure-9_chunking-overhead.csv"):
        length, chunk = int(row["prefill_length"]), int(row["chunk_size"])
        chunks = [BatchShape().with_chunk(min(chunk, length - start), start) for start in range(0, length, chunk)]
        runs.append((chunks, float(row["prefill_execution_time"]) / 1e3))
    model, gpu, tp = MODELS["01-ai/Yi-34B"], A100_80GB, 2
    key = {"model": model.name, "gpu": gpu.name, "tensor_parallel": tp, "source": "sarathi-serve osdi-experiments"}
    latency = LinearLatencyModel.fit(shapes, times, SARATHI_KNOTS, key, runs)
    latency.coefficients[feature_names(SARATHI_KNOTS).index("decode_context")] = \
        model.kv_bytes_per_token / tp / gpu.memory_bandwidth
    return GPUProfile(latency, kv_capacity_tokens(model, gpu, tp, memory_utilization))


def distserve_a100_profile(path: Path, model_name: str = "facebook/opt-13b", tensor_parallel: int = 1,
                           memory_utilization: float = 0.9) -> GPUProfile:
    """An OPT model on A100-80GB from DistServe's fitted coefficients (OSDI'24, `simdistserve`, in ms):
    prefill = a + b·Σlen + c·Σlen², decode = a + b·Σcontext + c·batch with other (a, b, c) from
    `decoding_large_small_bs_threshold` up. The formulas are sampled over batch shapes and refitted into the
    linear form (one constant for both phases, a hinge at the threshold); the fit error is in the profile."""
    data = json.loads(Path(path).read_text())
    try:
        coefficients = data[model_name][str(tensor_parallel)]
    except KeyError:
        known = ", ".join(f"{m} (tp {', '.join(v)})" for m, v in data.items())
        raise ValueError(f"{path} has no {model_name} at tensor parallel {tensor_parallel}; it has {known}") from None
    threshold = int(coefficients["decoding_large_small_bs_threshold"])
    shapes, times = [], []
    for batch in (1, 2, 4, 8):
        for length in (16, 64, 128, 256, 512, 1024, 2048):
            a, b, c = coefficients["prefill"]
            shape = BatchShape()
            for _ in range(batch):
                shape = shape.with_chunk(length, 0)
            shapes.append(shape)
            times.append((a + b * batch * length + c * batch * length**2) / 1e3)
    for batch in (1, 2, 4, 8, 16, 32, 64, 95, 128, 192, 256):
        for context in (128, 512, 1024, 2048):
            a, b, c = coefficients["decoding_smallbs" if batch < threshold else "decoding_largebs"]
            shapes.append(_decodes(BatchShape(), batch, context))
            times.append((a + b * batch * context + c * batch) / 1e3)
    model = MODELS[model_name]
    key = {"model": model_name, "gpu": A100_80GB.name, "tensor_parallel": tensor_parallel,
           "source": f"distserve {Path(path).name}"}
    latency = LinearLatencyModel.fit(shapes, times, (threshold,), key)
    return GPUProfile(latency, kv_capacity_tokens(model, A100_80GB, tensor_parallel, memory_utilization))


def _decodes(shape: BatchShape, count: int, context: int) -> BatchShape:
    for _ in range(count):
        shape = shape.with_decode(context)
    return shape


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_capacity_table(path: Path) -> list[tuple[str, int, int, int]]:
    """(model, tp, DistServe's KV tokens, ours at utilization 1) for every pipeline-parallel-1 row we know."""
    out = []
    for row in _rows(path):
        if row["pp"] == "1" and row["model"] in MODELS:
            tp = int(row["tp"])
            try:
                ours = kv_capacity_tokens(MODELS[row["model"]], A100_80GB, tp, 1.0)
            except ValueError:
                continue
            out.append((row["model"], tp, int(row["max_num_tokens"]), ours))
    return out


def load_sim_profile(spec: str, gpu_model: str = "facebook/opt-13b", tensor_parallel: int = 1,
                     memory_utilization: float = 0.9) -> tuple[LinearLatencyModel, int | None]:
    """--profile: a JSON written by `pacer profile` (no KV capacity: the caller gives one), Sarathi-Serve's
    A100 directory, or a DistServe coefficient JSON (with `gpu_model` and `tensor_parallel`)."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "figure-2_decode.csv").exists():
            raise ValueError(f"{path} is not Sarathi-Serve's profile directory (no figure-2_decode.csv)")
        profile = sarathi_a100_profile(path, memory_utilization)
        return profile.latency, profile.kv_capacity_tokens
    if not path.exists():
        raise FileNotFoundError(f"latency profile {path} does not exist")
    data = json.loads(path.read_text())
    if data.get("kind") == "linear":
        return LinearLatencyModel.from_json(data), None
    if any(isinstance(v, dict) and any("prefill" in c for c in v.values() if isinstance(c, dict))
           for v in data.values()):
        profile = distserve_a100_profile(path, gpu_model, tensor_parallel, memory_utilization)
        return profile.latency, profile.kv_capacity_tokens
    raise ValueError(f"{path}: neither a pacer profile nor DistServe coefficients")

