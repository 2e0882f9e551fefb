"""CUDA graphs of decode steps (run where a GPU is: `pytest tests/model/test_cuda_graphs.py`): the same tokens as
eager steps, padding rows that touch no request's KV, and eager fallback for what no graph holds."""

from __future__ import annotations

import pytest
import torch

from pacer.config import SchedulerConfig
from pacer.engine.detokenizer import Detokenizer
from pacer.engine.engine import Engine
from pacer.kv import KVCacheManager
from pacer.model.attention import allocate_kv_cache
from pacer.model.cuda_graphs import _sizes
from pacer.model.runner import ModelRunner
from pacer.request import Request, SamplingParams
from pacer.scheduling import scheduler_class
from tests.tiny import TINY, tiny_model

NUM_BLOCKS, BLOCK_SIZE = 64, 4


def test_graph_sizes_double_up_to_the_largest():
    assert _sizes(256, (1, 2, 4, 8)) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert _sizes(6, (1, 2, 4, 8)) == [1, 2, 4, 6]
    assert _sizes(3, (4,)) == [3]


def cuda_engine(graphs: bool) -> Engine:
    model = tiny_model().to("cuda")
    cache = allocate_kv_cache(TINY.num_layers, NUM_BLOCKS + graphs, BLOCK_SIZE, TINY.num_kv_heads, TINY.head_dim,
                              torch.float32, torch.device("cuda"))
    runner = ModelRunner(model, cache, BLOCK_SIZE, torch.device("cuda"), null_block=NUM_BLOCKS if graphs else None)
    runner.capture_decode_graphs(max_batch=6, max_model_len=128)
    config = SchedulerConfig(scheduler="sarathi", max_num_seqs=8, max_num_batched_tokens=16)
    scheduler = scheduler_class("sarathi")(config, KVCacheManager(runner.num_blocks, BLOCK_SIZE), 256,
                                           eos_token_id=TINY.eos_token_id)
    return Engine(scheduler, runner, Detokenizer(None))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_replays_give_the_eager_tokens():
    """Seven requests with prompts of 3-40 tokens and up to 150 outputs: decode batches of 1-7 (7 has no graph of
    its own above 6: eager), contexts across several widths; every token equals the eager engine's."""
    outputs = {}
    for graphs in (False, True):
        engine = cuda_engine(graphs)
        assert (engine.executor.graphs is not None) == graphs and engine.executor.num_blocks == NUM_BLOCKS
        replays: list[int] = []  # decode batch sizes a graph ran
        if graphs:
            engine.executor.graphs.run = counted(engine.executor.graphs.run, replays)
        for i, (prompt, max_tokens) in enumerate([(3, 150), (40, 20), (7, 90), (12, 60), (25, 5), (5, 100),
                                                  (9, 30)]):
            engine.add_request(Request(f"r{i}", list(range(10 + i, 10 + i + prompt)),
                                       SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)))
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished:
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        outputs[graphs] = tokens
        if graphs:
            assert min(replays) == 1 and max(replays) == 6  # 7 decodes, or a context past 128 tokens: eager
    assert outputs[True] == outputs[False]


def counted(run, replays: list[int]):
    def wrapper(input_ids, positions, decode):
        logits = run(input_ids, positions, decode)
        if logits is not None:
            replays.append(len(decode))
        return logits
    return wrapper


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_replay_writes_only_its_requests_slots_and_matches_the_eager_logits():
    """Three decodes padded to a graph of 4: their logits equal an eager forward's, and the padding row writes the
    reserved block, not block 0 (which a request holds)."""
    engine = cuda_engine(True)
    runner = engine.executor
    decode = [([0, 1], 6), ([2, 3, 4], 9), ([5], 2)]  # (blocks, context with the new token)
    input_ids, positions = [11, 12, 13], [5, 8, 1]
    for layer in range(TINY.num_layers):  # some context to attend to
        runner.cache.k[layer].normal_()
        runner.cache.v[layer].normal_()
    before = [k[:NUM_BLOCKS].clone() for k in runner.cache.k]
    logits = runner.graphs.run(input_ids, positions, decode).clone()
    written = {blocks[(c - 1) // BLOCK_SIZE] for blocks, c in decode}
    for layer, k in enumerate(runner.cache.k):
        changed = {int(b) for b in (k[:NUM_BLOCKS] != before[layer]).flatten(1).any(1).nonzero().flatten()}
        assert changed <= written
    from pacer.model.attention import AttentionMetadata

    meta = AttentionMetadata.build(BLOCK_SIZE, [(b, c) for b, c in decode], [], "cuda")
    eager = runner.model(torch.tensor(input_ids, device="cuda"), torch.tensor(positions, device="cuda"),
                         runner.cache, meta, torch.arange(3, device="cuda"))
    torch.testing.assert_close(logits, eager, rtol=1e-4, atol=1e-4)
