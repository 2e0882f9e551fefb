"""Workload generator: arrival statistics, seeds, exact prompt token counts, caps, trace reading and errors."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest

from pacer.bench.trace import TraceError, TraceRecord, read_trace
from pacer.bench.workload import BenchRequest, WorkloadConfig, build_workload
from tests.strict import skip_or_fail

TRACES = Path(__file__).resolve().parents[2] / "benchmarks" / "data"


@pytest.fixture(scope="module")
def tokenizer():
    from pacer.model.weights import load_tokenizer, resolve_model_path

    try:
        return load_tokenizer(resolve_model_path(None))
    except FileNotFoundError as error:
        skip_or_fail(str(error))


def shipped_trace(name: str) -> Path:
    return TRACES / name


def assert_exact(requests: list[BenchRequest], tokenizer) -> None:
    for request in requests:
        assert len(tokenizer.encode(request.prompt)) == request.num_prompt_tokens, request.index


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- arrivals -----------------------------------------------------------------------------------------------------


def test_poisson_mean_gap_is_one_over_rate(tokenizer):
    requests = build_workload(WorkloadConfig(num_requests=5000, rate=4.0, prompt_tokens=2, output_tokens=2), tokenizer)
    arrivals = np.array([r.arrival_s for r in requests])
    assert arrivals[0] == 0.0 and np.all(np.diff(arrivals) >= 0)
    assert np.diff(arrivals).mean() == pytest.approx(1 / 4.0, rel=0.05)


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0])
def test_gamma_matches_rate_and_cv(tokenizer, cv):
    config = WorkloadConfig(num_requests=5000, arrival="gamma", rate=10.0, cv=cv, prompt_tokens=2, output_tokens=2)
    gaps = np.diff([r.arrival_s for r in build_workload(config, tokenizer)])
    assert gaps.mean() == pytest.approx(0.1, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.10)


def test_closed_loop_has_no_arrival_times(tokenizer):
    requests = build_workload(WorkloadConfig(num_requests=20, arrival="concurrency", concurrency=4), tokenizer)
    assert [r.arrival_s for r in requests] == [None] * 20
    assert [r.index for r in requests] == list(range(20))


def test_trace_replay_scales_time(tokenizer, tmp_path):
    trace = write(tmp_path, "t.jsonl", "".join(
        json.dumps({"timestamp": t, "input_length": 5, "output_length": 3, "hash_ids": [i]}) + "\n"
        for i, t in enumerate([1000, 1500, 4000])))
    config = WorkloadConfig(num_requests=3, arrival="trace", trace=str(trace), time_scale=0.5)
    assert [r.arrival_s for r in build_workload(config, tokenizer)] == [0.0, 0.25, 1.5]


def test_trace_arrivals_need_timestamps_and_enough_records(tokenizer, tmp_path):
    lengths = write(tmp_path, "l.csv", "num_prefill_tokens,num_decode_tokens\n5,3\n6,4\n")
    with pytest.raises(ValueError, match="timestamps"):
        build_workload(WorkloadConfig(num_requests=2, arrival="trace", trace=str(lengths)), tokenizer)
    with pytest.raises(ValueError, match="only 2 records"):
        build_workload(WorkloadConfig(num_requests=3, lengths="trace", trace=str(lengths)), tokenizer)


def test_trace_sample_draws_lengths_for_runs_longer_than_the_trace(tmp_path):
    from pacer.bench.workload import request_timings

    lengths = write(tmp_path, "l.csv", "num_prefill_tokens,num_decode_tokens\n5,3\n6,4\n7,5\n")
    config = WorkloadConfig(num_requests=50, lengths="trace", trace=str(lengths), trace_sample=True)
    timings = request_timings(config)
    assert len(timings) == 50 and {(p, o) for _, p, o, _ in timings} == {(5, 3), (6, 4), (7, 5)}
    assert timings == request_timings(config)
    assert timings != request_timings(dataclasses.replace(config, seed=1))
    with pytest.raises(ValueError, match="cannot replay"):
        WorkloadConfig(arrival="trace", trace=str(lengths), trace_sample=True)


def test_slo_classes_are_drawn_by_share_and_seeded(tokenizer):
    from pacer.bench.workload import request_timings

    config = WorkloadConfig(num_requests=2000, prompt_tokens=4, output_tokens=2,
                            slo_classes="interactive:0.3:1000:200,batch:0.7:20000:1000")
    classes = [c for *_, c in request_timings(config)]
    assert classes.count("interactive") / 2000 == pytest.approx(0.3, abs=0.03)
    assert classes == [c for *_, c in request_timings(config)]
    plain = dataclasses.replace(config, slo_classes=None)
    assert [t[:3] for t in request_timings(config)] == [t[:3] for t in request_timings(plain)]  # nothing else moves
    small = dataclasses.replace(config, num_requests=20)
    assert [r.slo_class for r in build_workload(small, tokenizer)] == classes[:20]
    with pytest.raises(ValueError, match="add up to 1"):
        WorkloadConfig(slo_classes="a:0.5:100:100")


def test_length_mix_draws_components_by_share_within_their_ranges():
    from pacer.bench.workload import request_timings

    config = WorkloadConfig(num_requests=2000, lengths="mix", length_mix="0.9:64-1024:32-512,0.1:6000:64-256",
                            max_model_len=8192)
    timings = request_timings(config)
    lengths = [(prompt, output) for _, prompt, output, _ in timings]
    long = [(p, o) for p, o in lengths if p == 6000]
    assert len(long) / 2000 == pytest.approx(0.1, abs=0.02)
    assert all(64 <= o <= 256 for _, o in long)
    assert all(64 <= p <= 1024 and 32 <= o <= 512 for p, o in lengths if p != 6000)
    assert len({p for p, _ in lengths}) > 500  # uniform within the range, not a few values
    assert timings == request_timings(config)
    fixed = dataclasses.replace(config, lengths="fixed", length_mix=None)
    assert [t[0] for t in timings] == [t[0] for t in request_timings(fixed)]  # its own stream: arrivals stay put


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lengths": "mix"}, "length_mix must be set"),
    ({"length_mix": "1:10:10"}, "length_mix must be set"),
    ({"lengths": "mix", "length_mix": "0.5:10:10"}, "add up to 1"),
    ({"lengths": "mix", "length_mix": "1:10-5:10"}, "length_mix: a component"),
    ({"lengths": "mix", "length_mix": "1:10:0"}, "length_mix: a component"),
    ({"lengths": "mix", "length_mix": "1:ten:10"}, "length_mix: a component"),
    ({"lengths": "mix", "length_mix": "1:10"}, "length_mix: a component"),
])
def test_length_mix_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WorkloadConfig(**kwargs)


# ---- seeds and prompts ----------------------------------------------------------------------------------------------


def test_same_seed_same_workload_and_other_seeds_differ(tokenizer):
    config = WorkloadConfig(num_requests=50, lengths="uniform", prompt_tokens=64, output_tokens=32, seed=7)
    assert build_workload(config, tokenizer) == build_workload(config, tokenizer)
    other = build_workload(dataclasses.replace(config, seed=8), tokenizer)
    first = build_workload(config, tokenizer)
    assert [r.arrival_s for r in other] != [r.arrival_s for r in first]
    assert [r.prompt for r in other] != [r.prompt for r in first]
    assert [r.num_prompt_tokens for r in other] != [r.num_prompt_tokens for r in first]


def test_fixed_lengths_are_exact_and_prompts_distinct(tokenizer):
    requests = build_workload(WorkloadConfig(num_requests=100, prompt_tokens=300, output_tokens=17), tokenizer)
    assert_exact(requests, tokenizer)
    assert {(r.num_prompt_tokens, r.max_tokens) for r in requests} == {(300, 17)}
    assert len({r.prompt for r in requests}) == 100
    assert len({tokenizer.encode(r.prompt)[0] for r in requests}) == 100  # not even a first token shared


def test_one_token_prompts_are_distinct(tokenizer):
    requests = build_workload(WorkloadConfig(num_requests=1000, prompt_tokens=1, output_tokens=1), tokenizer)
    assert_exact(requests, tokenizer)
    assert len({r.prompt for r in requests}) == 1000


def test_uniform_lengths_are_exact_and_in_range(tokenizer):
    config = WorkloadConfig(num_requests=200, lengths="uniform", prompt_tokens=600, prompt_tokens_min=1,
                            output_tokens=50, output_tokens_min=10)
    requests = build_workload(config, tokenizer)
    assert_exact(requests, tokenizer)
    assert all(1 <= r.num_prompt_tokens <= 600 and 10 <= r.max_tokens <= 50 for r in requests)
    assert len({r.num_prompt_tokens for r in requests}) > 100


def test_trace_lengths_are_exact(tokenizer):
    config = WorkloadConfig(num_requests=100, lengths="trace", trace=str(shipped_trace("sharegpt_8k_llama2_lengths.csv")),
                            length_scale=0.25)
    records = read_trace(config.trace)[:100]
    requests = build_workload(config, tokenizer)
    assert_exact(requests, tokenizer)
    assert requests[0].num_prompt_tokens == round(74 * 0.25) and requests[0].max_tokens == round(918 * 0.25)
    assert all(r.num_prompt_tokens + r.max_tokens <= 2048 for r in requests)
    assert [r.num_prompt_tokens for r in requests][:5] == [max(1, round(x.prompt_tokens / 4)) for x in records][:5]


def test_length_scale_rounding_and_max_model_len_cap(tokenizer, tmp_path):
    trace = write(tmp_path, "l.csv", "num_prefill_tokens,num_decode_tokens\n10,6\n3000,100\n500,5000\n1,0\n")
    config = WorkloadConfig(num_requests=4, lengths="trace", trace=str(trace), length_scale=0.5, max_model_len=1024)
    requests = build_workload(config, tokenizer)
    assert [(r.num_prompt_tokens, r.max_tokens) for r in requests] == [
        (5, 3),  # scaled
        (974, 50),  # prompt cut so that prompt + output == max_model_len
        (1, 1023),  # the output alone overflows: one prompt token, the rest output
        (1, 1),  # 0.5 rounds to 0, kept at 1; output 0 in the trace is sent as 1
    ]
    assert_exact(requests, tokenizer)


def test_fixed_lengths_are_capped_too(tokenizer):
    requests = build_workload(WorkloadConfig(num_requests=2, prompt_tokens=200, output_tokens=100, max_model_len=256),
                              tokenizer)
    assert [(r.num_prompt_tokens, r.max_tokens) for r in requests] == [(156, 100)] * 2


def test_mooncake_requests_share_their_first_block(tokenizer, tmp_path):
    lines = [  # blocks of 512 * 1/32 = 16 tokens
        {"timestamp": 0, "input_length": 1600, "output_length": 64, "hash_ids": [7, 1, 2, 3]},
        {"timestamp": 10, "input_length": 1000, "output_length": 64, "hash_ids": [7, 4]},
        {"timestamp": 20, "input_length": 1600, "output_length": 64, "hash_ids": [8, 1, 2, 3]},
        {"timestamp": 30, "input_length": 3000, "output_length": 64, "hash_ids": [7, 1]},  # blocks run out: tail
    ]
    trace = write(tmp_path, "m.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    config = WorkloadConfig(num_requests=4, arrival="trace", lengths="trace", trace=str(trace), length_scale=1 / 32)
    requests = build_workload(config, tokenizer)
    assert_exact(requests, tokenizer)
    assert [r.num_prompt_tokens for r in requests] == [50, 31, 50, 94]
    a, b, c, d = (tokenizer.encode(r.prompt) for r in requests)
    assert a[:16] == b[:16] and a[16] != b[16]  # same block 7, then 1 vs 4
    assert a[0] != c[0] and a[16:48] == c[16:48]  # blocks 1, 2, 3 hashed the same wherever they appear
    assert d[:32] == a[:32] and len(d) == 94


def test_real_mooncake_workload_is_exact(tokenizer):
    config = WorkloadConfig(num_requests=50, arrival="trace", lengths="trace", time_scale=0.1, length_scale=1 / 16,
                            trace=str(shipped_trace("mooncake_conversation.jsonl")), max_model_len=1024)
    requests = build_workload(config, tokenizer)
    assert_exact(requests, tokenizer)
    first, second = (tokenizer.encode(r.prompt) for r in requests[:2])
    assert first[:32] == second[:32] and first[32] != second[32]  # both start with hash id 0, then differ


def test_large_workload_is_fast(tokenizer):
    import time

    start = time.perf_counter()
    requests = build_workload(WorkloadConfig(num_requests=1000, prompt_tokens=1000, output_tokens=10), tokenizer)
    assert time.perf_counter() - start < 5.0  # ~0.6 s here; 10,000 such requests take ~1.5 s
    assert_exact(requests[::100], tokenizer)


class PairCostingTokenizer:
    """The real tokenizer, except that once armed two adjacent words with the same first letter cost an extra
    token: a context effect that the word-list check (run unarmed) cannot see, so only prompt checks catch it."""

    def __init__(self, real) -> None:
        self.real = real
        self.armed = False
        self.vocab_size = real.vocab_size
        self.all_special_ids = real.all_special_ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.real.decode(ids, skip_special_tokens)

    def encode(self, text: str) -> list[int]:
        ids = self.real.encode(text)
        words = text.split(" ")[1:]
        return ids + [0] * sum(a[:1] == b[:1] for a, b in itertools.pairwise(words)) if self.armed else ids


def test_sampled_check_catches_a_miscount_and_every_prompt_is_fixed(tokenizer, monkeypatch):
    from pacer.bench import workload

    fake = PairCostingTokenizer(tokenizer)
    config = WorkloadConfig(num_requests=50, prompt_tokens=200, output_tokens=8)
    plain = build_workload(config, fake)  # unarmed: caches the word list
    fake.armed = True
    monkeypatch.setattr(workload, "_VERIFY_TOKENS", 1000)  # check only every 10th prompt first
    fixed = build_workload(config, fake)
    assert_exact(fixed, fake)
    assert all(r.num_prompt_tokens == 200 for r in fixed)
    assert all(f.prompt != p.prompt for f, p in zip(fixed, plain))


# ---- config validation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("num_requests", 0), ("arrival", "burst"), ("rate", 0.0), ("rate", float("inf")), ("cv", -1.0),
    ("concurrency", 0), ("lengths", "zipf"), ("prompt_tokens", 0), ("output_tokens", 0), ("prompt_tokens_min", 0),
    ("output_tokens_min", 200), ("trace_format", "csv"), ("time_scale", 0.0), ("length_scale", -2.0),
    ("max_model_len", 1), ("seed", -1),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        WorkloadConfig(**{field: value})


@pytest.mark.parametrize("kwargs", [{"arrival": "trace"}, {"lengths": "trace"}])
def test_config_needs_a_trace_for_trace_modes(kwargs):
    with pytest.raises(ValueError, match="trace must be set"):
        WorkloadConfig(**kwargs)


# ---- reading traces -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "fmt", "rows", "first"), [
    ("azure2023_conv.csv", "azure", 19_366, TraceRecord(0.0, 374, 44)),
    ("sharegpt_8k_llama2_lengths.csv", "lengths", 30_731, TraceRecord(None, 74, 918)),
    ("arxiv_4k_llama2_lengths.csv", "lengths", 28_257, TraceRecord(None, 3772, 54)),
    ("mooncake_conversation.jsonl", "mooncake", 12_031, TraceRecord(0.0, 6758, 500, tuple(range(14)))),
])
def test_reads_the_shipped_traces(tmp_path, name, fmt, rows, first):
    path = shipped_trace(name)
    records = read_trace(path)
    assert len(records) == rows
    assert records[0] == first
    head = write(tmp_path, name, "".join(path.open().readlines()[:20]))  # detection == the explicit format
    assert read_trace(head) == read_trace(head, fmt) == records[:20 - (fmt != "mooncake")]


def test_azure_timestamps_are_seconds_from_the_first_request():
    records = read_trace(shipped_trace("azure2023_conv.csv"))
    assert records[1].timestamp_s == pytest.approx(50.995169 - 46.68059)  # 18:15:50.9951690 - 18:15:46.6805900
    assert records[-1].timestamp_s == pytest.approx(3501.72, abs=0.01)  # 58 minutes


def test_unknown_format_lists_the_known_ones(tmp_path):
    path = write(tmp_path, "odd.csv", "a,b,c\n1,2,3\n")
    with pytest.raises(TraceError, match=r"odd\.csv:1: unknown trace format.*azure.*lengths.*mooncake"):
        read_trace(path)


def test_explicit_format_must_match_the_header(tmp_path):
    path = write(tmp_path, "l.csv", "num_prefill_tokens,num_decode_tokens\n5,3\n")
    with pytest.raises(TraceError, match=r"l\.csv:1: azure trace needs column\(s\) TIMESTAMP"):
        read_trace(path, "azure")
    with pytest.raises(ValueError, match="fmt must be one of"):
        read_trace(path, "parquet")


AZURE = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n"
LENGTHS = "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n74,918,992,0.08\n"
MOONCAKE = '{"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": [0]}\n'


@pytest.mark.parametrize(("name", "text", "line", "message"), [
    ("a.csv", AZURE + "2023-11-16 18:15:47.0,374\n", 3, "missing GeneratedTokens"),
    ("a.csv", AZURE + "\n2023-11-16 18:15:47.0,12x,5\n", 4, "ContextTokens must be an integer"),
    ("a.csv", AZURE + "2023-11-16 18:15:47.0,10,-1\n", 3, "GeneratedTokens must be >= 0"),
    ("a.csv", AZURE + "2023-11-16 18:15:47.0,10,1\nyesterday,10,1\n", 4, "TIMESTAMP is not a date"),
    ("a.csv", AZURE + "2023-11-16 18:15:45.0,10,1\n", 3, "timestamp goes backwards"),
    ("l.csv", LENGTHS + "0,5,5,0\n", 3, "num_prefill_tokens must be >= 1"),
    ("l.csv", LENGTHS + "7.5,5,12.5,1.5\n", 3, "num_prefill_tokens must be an integer"),
    ("l.csv", LENGTHS + LENGTHS.splitlines()[1] + "\n,4,4,0\n", 4, "missing num_prefill_tokens"),
    ("m.jsonl", MOONCAKE + '{"timestamp": 5, "input_length": 10\n', 2, "invalid JSON"),
    ("m.jsonl", MOONCAKE * 2 + '{"timestamp": 5, "input_length": 10}\n', 3, "missing output_length"),
    ("m.jsonl", MOONCAKE + '{"timestamp": 5, "input_length": 10.5, "output_length": 1}\n', 2, "input_length must be"),
    ("m.jsonl", MOONCAKE + '{"timestamp": 5, "input_length": 10, "output_length": -3}\n', 2, "output_length must be"),
    ("m.jsonl", MOONCAKE + '{"timestamp": "soon", "input_length": 1, "output_length": 1}\n', 2, "timestamp must be"),
    ("m.jsonl", MOONCAKE + '{"timestamp": 5, "input_length": 1, "output_length": 1, "hash_ids": [-1]}\n', 2,
     "hash_ids must be >= 0"),
    ("m.jsonl", MOONCAKE + "[1, 2]\n", 2, "expected a JSON object"),
])
def test_malformed_rows_name_the_file_and_line(tmp_path, name, text, line, message):
    path = write(tmp_path, name, text)
    with pytest.raises(TraceError, match=f"{re.escape(name)}:{line}: {message}") as error:
        read_trace(path)
    assert error.value.path == str(path) and error.value.line == line


def test_empty_trace_is_an_error(tmp_path):
    with pytest.raises(TraceError, match=r"e\.csv:1: empty trace"):
        read_trace(write(tmp_path, "e.csv", "\n"))


def test_conversations_open_at_the_arrivals_and_their_later_turns_follow_answers(tokenizer):
    config = WorkloadConfig(num_requests=12, rate=2.0, turns=3, think_time_s=5.0, prompt_tokens=40, output_tokens=20,
                            system_prompt_tokens=16, max_model_len=150)
    requests = build_workload(config, tokenizer)
    single = build_workload(dataclasses.replace(config, turns=1, think_time_s=0.0), tokenizer)
    assert [r.turn for r in requests] == [0, 1, 2] * 4
    # a conversation opens at each of the first 4 Poisson arrivals (--rate counts conversations); later turns
    # have no send time of their own, only a think time
    assert [r.arrival_s for r in requests if not r.turn] == [r.arrival_s for r in single[:4]]
    assert all(r.arrival_s is None and r.think_s > 0 for r in requests if r.turn)
    assert all(r.think_s == 0 for r in requests if not r.turn)
    # each turn's message and answer get an equal part of the context, so the last turn fits
    assert all(r.num_prompt_tokens + r.max_tokens <= 150 // 3 for r in requests)
    # the system prompt opens a conversation's first message only: a later turn's prompt already holds it
    opening = tokenizer.decode(tokenizer.encode(requests[0].prompt)[:16])
    assert all(r.prompt.startswith(opening) == (not r.turn) for r in requests)
    from pacer.bench.workload import shared_prefixes

    assert [len(head) for head in shared_prefixes(config)] == [16, 0, 0] * 4
    with pytest.raises(ValueError, match="turns"):
        WorkloadConfig(turns=0)


def test_think_times_from_a_traces_conversations_keep_its_spread_at_the_mean_asked(tmp_path):
    """A turn is the later request whose prompt extends all of an earlier one's full blocks (two at least); the
    think times are drawn from those gaps, scaled to the mean asked for."""
    from pacer.bench.trace import turn_gaps
    from pacer.bench.workload import conversation_turns

    lines = [(0, [0, 1, 2, 3]),  # opens a conversation (its last block partial)
             (1, [0, 9]),  # shares only the system block: no turn of anything
             (4, [0, 1, 2, 5, 6]),  # extends the first's full blocks: a gap of 4 s
             (5, [0, 1, 7]),  # two blocks but not all of the first's full ones: no turn
             (14, [0, 1, 2, 5, 6, 8])]  # extends the third: 10 s
    path = write(tmp_path, "c.jsonl", "".join(
        json.dumps({"timestamp": 1000 * t, "input_length": 512 * len(b), "output_length": 8, "hash_ids": b}) + "\n"
        for t, b in lines))
    assert turn_gaps(read_trace(path)) == [4.0, 10.0]
    config = WorkloadConfig(num_requests=400, turns=4, think_time_s=0.7, think_times="trace", trace=path)
    think = [s for turn, s in conversation_turns(config) if turn]
    assert set(np.round(think, 9)) == {0.4, 1.0}  # 4 and 10 s, scaled by 0.7 / 7
    assert [s for turn, s in conversation_turns(config) if not turn] == [0.0] * 100
    with pytest.raises(ValueError, match="think_time_s > 0"):
        WorkloadConfig(turns=2, think_times="trace", trace=path)
    with pytest.raises(ValueError, match="no conversations"):
        conversation_turns(WorkloadConfig(num_requests=4, turns=2, think_time_s=1.0, think_times="trace",
                                          trace=write(tmp_path, "a.jsonl", MOONCAKE)))
