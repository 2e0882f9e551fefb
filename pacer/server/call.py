"""One HTTP call in flight (its choices, usage and latency) and the SLO it was promised."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from pacer.engine.stream import RequestStream
from pacer.request import SLO, Request, RequestOutput
from pacer.scheduling import TokenLogprobs
from pacer.server.metrics import Metrics
from pacer.server.protocol import PromptTokensDetails, SamplingRequest, SLOReport, Usage, invalid


@dataclass
class Choice:
    """What one choice has produced so far."""

    index: int
    num_prompt_tokens: int
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[tuple[int, TokenLogprobs]] = field(default_factory=list)
    first_token_s: float | None = None
    last_token_s: float | None = None
    max_tbt_s: float = 0.0

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        if self.first_token_s is None or self.last_token_s is None or self.num_tokens < 2:
            return None
        return (self.last_token_s - self.first_token_s) / (self.num_tokens - 1)


class Call:
    """One HTTP call in flight: its engine stream, its choices, and the latency it reports."""

    def __init__(self, stream: RequestStream, requests: list[Request], num_prompt_tokens: int,
                 arrival_s: float, metrics: Metrics) -> None:
        self.stream = stream
        self.slo = requests[0].slo
        self.first_token_s: float | None = None
        self.choices = {r.request_id: Choice(i, r.num_prompt_tokens) for i, r in enumerate(requests)}
        self.num_prompt_tokens = num_prompt_tokens  # once per prompt, not per choice (as OpenAI)
        self.arrival_s = arrival_s
        self.metrics = metrics

    def observe(self, output: RequestOutput, keep: bool) -> Choice:
        """Fold an output into its choice (keeping text and logprobs only if `keep`); time it."""
        choice = self.choices[output.request_id]
        now = time.monotonic()
        if output.new_token_ids:
            if choice.last_token_s is None:
                self.metrics.ttft.observe(now - self.arrival_s)
                self.first_token_s = self.first_token_s or now
                choice.first_token_s = now
            else:
                self.metrics.itl.observe(now - choice.last_token_s)
                choice.max_tbt_s = max(choice.max_tbt_s, now - choice.last_token_s)
            choice.last_token_s = now
        choice.num_tokens = output.num_output_tokens
        choice.num_cached_tokens = output.num_cached_tokens
        if keep:
            choice.text.append(output.new_text)
            choice.logprobs += zip(output.new_token_ids, output.new_logprobs)
        if output.finished:
            choice.finish_reason = output.finish_reason.value
            self.metrics.e2e.observe(now - self.arrival_s)
        return choice

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices.values())

    def report(self) -> SLOReport:
        """The call's measured TTFT, TPOT and longest token gap against its SLO (the `pacer` response field)."""
        ttft = None if self.first_token_s is None else self.first_token_s - self.arrival_s
        max_tbt = max(c.max_tbt_s for c in self.choices.values())
        tpot = max((c.tpot_s for c in self.choices.values() if c.tpot_s is not None), default=None)
        met = ((self.slo.ttft_s is None or (ttft is not None and ttft <= self.slo.ttft_s))
               and (self.slo.tpot_s is None or tpot is None or tpot <= self.slo.tpot_s)
               and (self.slo.tbt_s is None or max_tbt <= self.slo.tbt_s))
        return SLOReport(ttft_ms=_ms(ttft), tpot_ms=_ms(tpot), max_tbt_ms=_ms(max_tbt),
                         ttft_slo_ms=_ms(self.slo.ttft_s), tpot_slo_ms=_ms(self.slo.tpot_s),
                         tbt_slo_ms=_ms(self.slo.tbt_s), slo_met=met)

    def usage(self) -> Usage:
        completion = sum(c.num_tokens for c in self.choices.values())
        cached = max(c.num_cached_tokens for c in self.choices.values())  # one prompt, whichever choice found it
        return Usage(prompt_tokens=self.num_prompt_tokens, completion_tokens=completion,
                     total_tokens=self.num_prompt_tokens + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))



def request_slo(body: SamplingRequest, headers: Mapping[str, str], default: SLO) -> SLO:
    """The body's SLO fields, else the x-slo-* headers, else the server's defaults."""
    values = {}
    for name, header, fallback in (("ttft_slo_ms", "x-slo-ttft-ms", default.ttft_s),
                                   ("tpot_slo_ms", "x-slo-tpot-ms", default.tpot_s),
                                   ("tbt_slo_ms", "x-slo-tbt-ms", default.tbt_s)):
        ms = getattr(body, name)
        if ms is None and header in headers:
            try:
                ms = float(headers[header])
            except ValueError:
                ms = math.nan
            if not 0 < ms <= 3.6e6:
                raise invalid(f"header {header} must be a number of milliseconds in (0, 3600000], got "
                              f"{headers[header]!r}", header)
        values[name] = fallback if ms is None else ms / 1e3
    return SLO(ttft_s=values["ttft_slo_ms"], tbt_s=values["tbt_slo_ms"], tpot_s=values["tpot_slo_ms"],
               priority=body.priority)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)
