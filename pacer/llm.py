"""Offline API: `LLM(model=...).generate(prompts, params)` and `.chat(messages)`, like vLLM's."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from pacer.config import EngineConfig
from pacer.engine.builder import build_engine
from pacer.request import FinishReason, Request, SamplingParams
from pacer.scheduling import TokenLogprobs

Prompt = str | list[int]
Message = dict[str, str]


@dataclass
class GenerationOutput:
    """One finished request: its text and ids, why it stopped, and when things happened (engine clock, s)."""

    request_id: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    arrival_s: float = 0.0
    first_token_s: float | None = None
    finish_s: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s


class LLM:
    """Loads the model once and runs batches of prompts to completion through the engine."""

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None,
                 **engine_options: Any) -> None:
        """Pass engine options by name (`dtype="float32"`, `scheduler="fcfs"`, ...) or a whole config."""
        if config is not None and (model is not None or engine_options):
            raise TypeError("pass either config or engine options, not both")
        self.config = config or EngineConfig.from_kwargs(model=model, **engine_options)
        self.engine, self.tokenizer = build_engine(self.config)
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[GenerationOutput]:
        """Prompts are text (no chat template; a BOS where the tokenizer adds one) or token id lists."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        ids = [self.tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p) for p in prompts]
        return self._run(ids, sampling_params, use_tqdm)

    def chat(self, messages: list[Message] | Sequence[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[GenerationOutput]:
        """One conversation (a list of {role, content}) or several; the model's chat template applies."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        ids = [self.tokenizer.encode(self.tokenizer.apply_chat_template(list(c), add_generation_prompt=True))
               for c in conversations]
        return self._run(ids, sampling_params, use_tqdm)

    def _run(self, prompts: list[list[int]], sampling_params, use_tqdm: bool) -> list[GenerationOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling_params)} sampling params")
        engine = self.engine
        results: dict[str, GenerationOutput] = {}
        requests = [Request(str(next(self._ids)), p, s) for p, s in zip(prompts, sampling_params)]
        try:  # all or nothing: one bad prompt refuses the batch
            for request in requests:
                engine.add_request(request)
                results[request.request_id] = GenerationOutput(request.request_id, request.prompt_token_ids,
                                                               arrival_s=request.arrival_s)
        except ValueError:
            for request in requests:
                engine.abort(request.request_id)
            raise
        with tqdm(total=len(requests), desc="generate", unit="req", disable=not use_tqdm) as bar:
            while engine.has_unfinished:
                for output in engine.step():
                    result = results[output.request_id]
                    result.text += output.new_text
                    result.token_ids += output.new_token_ids
                    result.logprobs += output.new_logprobs
                    if output.finished:
                        result.finish_reason = output.finish_reason
                        bar.update(1)
        for request in requests:
            result = results[request.request_id]
            result.first_token_s, result.finish_s = request.first_token_s, request.last_token_s
        return [results[r.request_id] for r in requests]
