"""The load generator: sends a workload to an OpenAI-compatible server and records what it saw.

One asyncio loop, aiohttp streaming (it sustained several times httpx's request rate: benchmarks/README.md), SSE
parsed from raw reads. Open loop (Poisson, gamma, trace): each request is sent at its arrival time
whatever happened to the others, so an overloaded server shows up as latency, not as a lower
offered rate. Closed loop: `concurrency` workers each
send their next request when the previous one ends. Every failure is recorded by kind; none
ends the run.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field

import aiohttp

from pacer.bench.metrics import RequestRecord, SLOTargets
from pacer.bench.workload import BenchRequest


@dataclass(frozen=True)
class ClientConfig:
    base_url: str = field(default="http://127.0.0.1:8000", metadata={"help": "the server, without /v1"})
    model: str | None = field(default=None, metadata={"help": "model name to send (default: the first /v1/models)"})
    api_key: str | None = field(default=None, metadata={"help": "sent as Authorization: Bearer KEY"})
    endpoint: str = field(default="completions", metadata={
        "help": "completions (prompt text) or chat (one user message)", "choices": ("completions", "chat")})
    ignore_eos: bool = field(default=True, metadata={
        "help": "force each output to max_tokens (dropped, and said in the report, if the server refuses it)"})
    timeout_s: float = field(default=600.0, metadata={"help": "per-request timeout in seconds"})
    send_slo: bool = field(default=True, metadata={
        "help": "send the run's SLO with every request as x-slo-ttft-ms and x-slo-tpot-ms (or x-slo-tbt-ms) "
                "headers (pacer plans with them; other servers ignore them)"})

    def __post_init__(self) -> None:
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be 'completions' or 'chat', got {self.endpoint!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")


def run_loop(main: Coroutine[object, object, list[RequestRecord]]) -> list[RequestRecord]:
    """Run the client on uvloop where it is installed: its callbacks cost a third of asyncio's, and on a
    loop that also timestamps every token, less work per event is less timestamp error."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


class LoadClient:
    """Runs one workload; `records` fills in as requests end (the progress callback sees each)."""

    def __init__(self, config: ClientConfig, on_record: Callable[[RequestRecord], None] | None = None,
                 slo: SLOTargets | None = None, count_tokens: Callable[[str], int] | None = None) -> None:
        """count_tokens(text): the tokens in a chunk's text, for servers that send no usage with each chunk
        (without it such a chunk counts as one token)."""
        self.config = config
        self.slo = slo
        self.on_record = on_record
        self.count_tokens = count_tokens
        self.ignore_eos = config.ignore_eos
        self.model = config.model
        self.t0 = 0.0

    async def run(self, requests: list[BenchRequest], concurrency: int | None = None) -> list[RequestRecord]:
        """Open loop unless `concurrency` is given (then arrival times are ignored)."""
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        if self.config.send_slo and self.slo is not None and not self.slo.classes:
            headers |= _slo_headers(self.slo)
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s, connect=30.0)
        # No connection cap: an open loop must not queue behind its own client. trust_env=False: a proxy
        # from the environment must not sit between the client and the server.
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(self.config.base_url, headers=headers, timeout=timeout, connector=connector,
                                         trust_env=False) as http:
            if self.model is None:
                self.model = await self._first_model(http)
            self.t0 = time.perf_counter()
            conversations = _conversations(requests)
            if concurrency is None:
                done = await asyncio.gather(*(self._open_loop(http, turns) for turns in conversations))
            else:
                queue, done = list(reversed(conversations)), []

                async def worker() -> None:
                    while queue:
                        done.append(await self._converse(http, queue.pop(), scheduled_s=None))

                await asyncio.gather(*(worker() for _ in range(concurrency)))
            return sorted((record for records in done for record in records), key=lambda r: r.index)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def _first_model(self, http: aiohttp.ClientSession) -> str:
        async with http.get("/v1/models") as response:
            response.raise_for_status()
            return (await response.json())["data"][0]["id"]

    async def _open_loop(self, http: aiohttp.ClientSession, turns: list[BenchRequest]) -> list[RequestRecord]:
        delay = (turns[0].arrival_s or 0.0) - self.now()
        if delay > 0:
            await asyncio.sleep(delay)
        return await self._converse(http, turns, scheduled_s=turns[0].arrival_s)

    async def _converse(self, http: aiohttp.ClientSession, turns: list[BenchRequest],
                        scheduled_s: float | None) -> list[RequestRecord]:
        """One conversation (a single request is one of one turn): each later turn is sent its think time after
        the answer before it, with the exchange so far in front of its message. A turn that was refused or failed
        ends the conversation: the turns left are recorded as refused, as the user would have seen them."""
        records: list[RequestRecord] = []
        history: list[tuple[str, str]] = []  # (user message, answer) so far
        for request in turns:
            if records and records[-1].status != "ok":
                records.append(self._not_sent(request, records[-1]))
                continue
            if request.turn:
                await asyncio.sleep(request.think_s)
                if scheduled_s is not None:  # open loop: it is due now, whatever the server did before
                    scheduled_s = self.now()
            # the conversation so far as counted here, and the message: the server's usage corrects it
            num_prompt_tokens = request.num_prompt_tokens + (
                records[-1].num_prompt_tokens + len(records[-1].token_times_s) if records else 0)
            answer: list[str] = []
            record = await self._send(http, request, scheduled_s, history, answer, num_prompt_tokens)
            history.append((request.prompt, "".join(answer)))
            records.append(record)
        return records

    def _not_sent(self, request: BenchRequest, before: RequestRecord) -> RequestRecord:
        record = RequestRecord(index=request.index, num_prompt_tokens=request.num_prompt_tokens,
                               max_tokens=request.max_tokens, scheduled_s=None, slo_class=request.slo_class,
                               turn=request.turn, status="rejected", error_kind="conversation_ended",
                               error=f"not sent: turn {before.turn} was {before.status} ({before.error_kind})")
        if self.on_record is not None:
            self.on_record(record)
        return record

    def _body(self, request: BenchRequest, history: list[tuple[str, str]]) -> dict:
        # continuous_usage_stats (vLLM's): the token count so far in every chunk, so a chunk that carries several
        # tokens is timed as that many tokens
        body = {"model": self.model, "max_tokens": request.max_tokens, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}, "temperature": 0}
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.config.endpoint == "chat":
            body["messages"] = [*({"role": role, "content": text} for user, answer in history
                                  for role, text in (("user", user), ("assistant", answer))),
                                {"role": "user", "content": request.prompt}]
        else:
            body["prompt"] = "".join(user + answer for user, answer in history) + request.prompt
        return body

    async def _send(self, http: aiohttp.ClientSession, request: BenchRequest, scheduled_s: float | None,
                    history: list[tuple[str, str]], answer: list[str], num_prompt_tokens: int) -> RequestRecord:
        """Send one request and read its stream; the answer's text pieces are appended to `answer`."""
        record = RequestRecord(index=request.index, num_prompt_tokens=num_prompt_tokens,
                               max_tokens=request.max_tokens, scheduled_s=scheduled_s, slo_class=request.slo_class,
                               turn=request.turn)
        path = "/v1/chat/completions" if self.config.endpoint == "chat" else "/v1/completions"
        headers = None  # the run's SLO travels in the session's headers; a class's, per request
        if self.config.send_slo and self.slo is not None and self.slo.classes:
            headers = _slo_headers(self.slo.of(request.slo_class))
        record.sent_s = self.now()
        try:
            async with http.post(path, json=self._body(request, history), headers=headers) as response:
                if response.status != 200:
                    await self._refused(response, record)
                else:
                    await self._read_stream(response, record, answer)
        except TimeoutError as error:
            self._fail(record, "timeout", repr(error))
        except aiohttp.ClientError as error:
            self._fail(record, "network", repr(error))
        if record.status == "ok" and record.finished_s is None:
            self._fail(record, "malformed_sse", "the stream ended without data: [DONE]")
        if self.on_record is not None:
            self.on_record(record)
        return record

    async def _refused(self, response: aiohttp.ClientResponse, record: RequestRecord) -> None:
        text = (await response.read()).decode(errors="replace")
        record.finished_s = self.now()
        if response.status in (429, 503):  # refused for load (vLLM's queue valve answers 503)
            record.status = "rejected"
            record.error_kind, record.error = f"http_{response.status}", text[:500]
            retry_after = response.headers.get("retry-after")
            record.retry_after_s = float(retry_after) if retry_after and retry_after.isdigit() else None
            return
        if response.status == 400 and self.ignore_eos and "ignore_eos" in text:
            self.ignore_eos = False  # this server does not take it: later requests go without
        kind = "http_4xx" if response.status < 500 else "http_5xx"
        self._fail(record, kind, f"HTTP {response.status}: {text[:500]}")

    async def _read_stream(self, response: aiohttp.ClientResponse, record: RequestRecord, answer: list[str]) -> None:
        """Parse SSE from whatever bytes each read returns, stamping every line in a read with that read's
        time: one wake-up per network read instead of one per line (a third fewer loop callbacks)."""
        pending, ended = b"", False
        async for chunk in response.content.iter_any():
            now = self.now()
            *lines, pending = (pending + chunk).split(b"\n")
            ended = any(line.startswith(b"data:") and not self._on_event(line[5:].strip(), now, record, answer)
                        for line in lines)
            if ended:
                break
        if record.status == "ok" and record.output_tokens is not None:
            record.token_count_error = (len(record.token_times_s) - record.output_tokens) or None

    def _on_event(self, data: bytes, now: float, record: RequestRecord, answer: list[str]) -> bool:
        """Record one SSE `data:` payload; False ends the stream (done, or failed)."""
        if data == b"[DONE]":
            record.finished_s = now
            return False
        try:
            event = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._fail(record, "malformed_sse", f"not JSON: {data[:200].decode(errors='replace')}")
            return False
        if "error" in event:
            self._fail(record, "http_5xx", f"error event: {str(event['error'])[:500]}")
            return False
        chat = self.config.endpoint == "chat"
        text = "".join(((choice.get("delta") or {}).get("content") if chat else choice.get("text")) or ""
                       for choice in event.get("choices") or [])
        usage = event.get("usage") or {}
        so_far = usage.get("completion_tokens")
        if record.turn and usage.get("prompt_tokens"):  # a later turn's prompt: as the server counted it
            record.num_prompt_tokens = usage["prompt_tokens"]
        if text:
            answer.append(text)
            # tokens this chunk carries: from the usage so far where the server sends it, else by tokenizing
            if so_far is not None:
                count = so_far - len(record.token_times_s)
            else:
                count = max(1, self.count_tokens(text)) if self.count_tokens is not None else 1
            record.token_times_s.extend([now] * count)
        if so_far is not None:
            record.output_tokens = so_far
        return True

    @staticmethod
    def _fail(record: RequestRecord, kind: str, message: str) -> None:
        record.status, record.error_kind, record.error = "failed", kind, message


def _conversations(requests: list[BenchRequest]) -> list[list[BenchRequest]]:
    """Requests grouped into conversations: a turn > 0 belongs with the request before it."""
    conversations: list[list[BenchRequest]] = []
    for request in requests:
        if request.turn and conversations:
            conversations[-1].append(request)
        else:
            conversations.append([request])
    return conversations


def _slo_headers(slo: SLOTargets) -> dict[str, str]:
    """The SLO as pacer reads it from a request (other servers ignore the headers): a run judged on the mean gap
    promises a TPOT, one judged on the p99 gap a TBT."""
    decode = "x-slo-tpot-ms" if slo.tbt_stat == "mean" else "x-slo-tbt-ms"
    return {name: f"{seconds * 1e3:g}" for name, seconds in (("x-slo-ttft-ms", slo.ttft_s), (decode, slo.tbt_s))
            if seconds is not None}
