"""Prometheus metrics under vLLM's names, in the `pacer:` namespace, so existing dashboards carry over.

Engine-side figures (iterations, queue/prefill/decode time, tokens) come from the engine's updates
through the EngineObserver hooks; TTFT, inter-token latency and E2E are measured by the server
from HTTP arrival, as METRICS.md defines them. What vLLM lacks: `pacer:request_rejected_total{reason}`,
`pacer:request_expired_total`, `pacer:request_stream_timeout_total`, and the latency model's rolling error
`pacer:latency_model_error{quantile}`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

import numpy as np
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pacer.engine.engine import IterationStats
from pacer.engine.frontend import Frontend
from pacer.engine.handle import ReplicaState
from pacer.engine.protocol import EngineLoad
from pacer.request import FinishReason, Request, RequestOutput

prometheus_client.disable_created_metrics()  # vLLM does the same: *_created series only add noise

# vLLM's buckets, so histograms from both servers line up.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)
_ITERATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
                      5.0, 10.0)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_ERROR_WINDOW = 500  # iterations in the latency model's rolling error
_ERROR_QUANTILES = (0.5, 0.9, 0.99)


class Metrics:
    """One registry per server (tests run several in one process). Every series has `model_name`."""

    def __init__(self, model_name: str, load: Callable[[], EngineLoad]) -> None:
        self.registry = registry = CollectorRegistry()
        labels = ["model_name"]

        def gauge(name: str, doc: str, read: Callable[[EngineLoad], float]) -> None:
            Gauge(name, doc, labels, registry=registry).labels(model_name).set_function(lambda: read(load()))

        def counter(name: str, doc: str, *extra: str) -> Counter:
            return Counter(name, doc, labels + list(extra), registry=registry)

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=registry).labels(model_name)

        gauge("pacer:num_requests_running", "Requests in the running batch.", lambda s: s.num_running)
        gauge("pacer:num_requests_waiting", "Requests waiting to be scheduled.", lambda s: s.num_waiting)
        gauge("pacer:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", lambda s: s.kv_cache_usage)
        self.prompt_tokens = counter("pacer:prompt_tokens", "Prefilled prompt tokens.").labels(model_name)
        self.generation_tokens = counter("pacer:generation_tokens", "Generated tokens.").labels(model_name)
        self.prefix_queries = counter("pacer:prefix_cache_queries", "Prompt tokens of requests that started, looked "
                                      "up in the prefix cache.").labels(model_name)
        self.prefix_hits = counter("pacer:prefix_cache_hits", "Of those, the tokens found cached (their prefill "
                                   "skipped).").labels(model_name)
        self.preemptions = counter("pacer:num_preemptions",
                                   "Requests preempted (KV freed, recomputed later).").labels(model_name)
        self.spec_drafts = counter("pacer:spec_decode_num_drafts",
                                   "Speculative decoding: decodes that verified drafts.").labels(model_name)
        self.spec_draft_tokens = counter("pacer:spec_decode_num_draft_tokens",
                                         "Speculative decoding: draft tokens verified.").labels(model_name)
        self.spec_accepted_tokens = counter("pacer:spec_decode_num_accepted_tokens",
                                            "Speculative decoding: draft tokens accepted.").labels(model_name)
        self._success = counter("pacer:request_success", "Finished requests by finish reason.", "finished_reason")
        self._rejected = counter("pacer:request_rejected", "Requests refused before running, by reason.", "reason")
        self._model_name = model_name
        self.ttft = histogram("pacer:time_to_first_token_seconds",
                              "HTTP arrival to first token.", _TTFT_BUCKETS)
        self.itl = histogram("pacer:inter_token_latency_seconds", "Time between output tokens (TBT).", _ITL_BUCKETS)
        self.e2e = histogram("pacer:e2e_request_latency_seconds", "HTTP arrival to last token.", _REQUEST_BUCKETS)
        self.queue_time = histogram("pacer:request_queue_time_seconds",
                                    "Arrival to first scheduled (scheduling delay).", _REQUEST_BUCKETS)
        self.prefill_time = histogram("pacer:request_prefill_time_seconds",
                                      "First scheduled to first token.", _REQUEST_BUCKETS)
        self.decode_time = histogram("pacer:request_decode_time_seconds",
                                     "First token to last token.", _REQUEST_BUCKETS)
        self.iteration_time = histogram("pacer:iteration_time_seconds",
                                        "Measured executor time of one engine iteration.", _ITERATION_BUCKETS)
        self.iteration_tokens = histogram("pacer:iteration_tokens_total",
                                          "Tokens scheduled in one engine iteration.", _TOKEN_BUCKETS)
        self.expired = counter("pacer:request_expired",
                               "Requests dropped because their TTFT deadline passed before they started "
                               "(--drop-expired).").labels(model_name)
        self.stream_timeouts = counter("pacer:request_stream_timeout",
                                       "Streams cut off because their client read nothing for --stream-timeout-s "
                                       "(their requests aborted).").labels(model_name)
        error = Gauge("pacer:latency_model_error", "Latency model: quantile of |measured - predicted| / "
                      f"measured iteration time over the last {_ERROR_WINDOW} iterations.",
                      labels + ["quantile"], registry=registry)
        self._errors: deque[float] = deque(maxlen=_ERROR_WINDOW)
        for q in _ERROR_QUANTILES:  # computed when scraped, not on the engine thread each iteration (49 us there)
            error.labels(model_name, str(q)).set_function(lambda q=q: self._error_quantile(q))

    def _error_quantile(self, q: float) -> float:
        errors = list(self._errors)  # one C call: a consistent copy while the engine thread appends
        return float(np.quantile(errors, q)) if errors else 0.0

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self._model_name, reason).inc()

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)

    # ---- EngineObserver (called on the engine thread; prometheus_client is thread-safe) ---------

    def iteration(self, stats: IterationStats, outputs: list[RequestOutput]) -> None:
        self.iteration_time.observe(stats.elapsed_s)
        self.iteration_tokens.observe(stats.num_prefill_tokens + stats.num_decode_tokens)
        if stats.predicted_s is not None and stats.elapsed_s > 0:
            self._errors.append(abs(stats.elapsed_s - stats.predicted_s) / stats.elapsed_s)
        if stats.num_preempted:
            self.preemptions.inc(stats.num_preempted)
        if stats.num_drafts:
            self.spec_drafts.inc(stats.num_drafts)
            self.spec_draft_tokens.inc(stats.num_draft_tokens)
            self.spec_accepted_tokens.inc(stats.num_accepted_tokens)
        for output in outputs:
            num_new = len(output.new_token_ids)
            if num_new and output.num_output_tokens == num_new:  # its first tokens: the prompt is done
                self.prompt_tokens.inc(output.num_prompt_tokens)
                self.prefix_queries.inc(output.num_prompt_tokens)
                self.prefix_hits.inc(output.num_cached_tokens)
            self.generation_tokens.inc(num_new)

    def request_finished(self, request: Request) -> None:
        reason = request.finish_reason.value if request.finish_reason else "abort"
        self._success.labels(self._model_name, reason).inc()
        if request.finish_reason is FinishReason.EXPIRED:
            self.expired.inc()
        if request.first_scheduled_s is not None and request.arrival_s is not None:
            self.queue_time.observe(request.first_scheduled_s - request.arrival_s)
            if request.first_token_s is not None:
                self.prefill_time.observe(request.first_token_s - request.first_scheduled_s)
                self.decode_time.observe(request.last_token_s - request.first_token_s)


class ReplicaCollector:
    """Per-replica series for /metrics (a prometheus_client collector), where replicas come and go (Ray)."""

    def __init__(self, frontend: Frontend, model_name: str) -> None:
        self.frontend = frontend
        self.model_name = model_name

    def collect(self) -> Iterator[object]:
        labels = ["model_name", "replica"]
        families = {
            "up": GaugeMetricFamily("pacer:replica_up", "1 if the replica is serving, 0 if it is restarting or dead.",
                                    labels=labels),
            "running": GaugeMetricFamily("pacer:replica_num_requests_running", "Requests in the replica's batch.",
                                         labels=labels),
            "waiting": GaugeMetricFamily("pacer:replica_num_requests_waiting", "Requests waiting in the replica.",
                                         labels=labels),
            "kv": GaugeMetricFamily("pacer:replica_kv_cache_usage_perc", "The replica's KV-cache usage (1 = full).",
                                    labels=labels),
            "restarts": CounterMetricFamily("pacer:replica_restarts", "Times Ray restarted the replica.",
                                            labels=labels),
            "routed": CounterMetricFamily("pacer:replica_requests_routed", "Requests the router sent to the replica.",
                                          labels=labels),
        }
        for r in self.frontend.replicas:
            values = {"up": float(r.state is ReplicaState.UP), "running": r.load.num_running,
                      "waiting": r.load.num_waiting, "kv": r.load.kv_cache_usage, "restarts": r.num_restarts,
                      "routed": r.num_routed}
            for name, family in families.items():
                family.add_metric([self.model_name, str(r.index)], values[name])
        yield from families.values()
        rerouted = CounterMetricFamily("pacer:requests_rerouted", "Requests moved to another replica because "
                                       "theirs died before their first token.", labels=["model_name"])
        rerouted.add_metric([self.model_name], self.frontend.num_rerouted)
        yield rerouted
