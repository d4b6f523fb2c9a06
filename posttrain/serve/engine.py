"""Continuous batching over one base model and many LoRA adapters: the generation engine behind ``posttrain serve``.

One background thread runs the model. At each token boundary it drops the rows that finished or whose client
left, decodes one token for every running row in ONE forward, each row through its own adapter (peft's
mixed-adapter batches: :meth:`AdapterRegistry.forward`), then prefills the requests that arrived (one forward for
all of them, left-padded; their first token comes from it) and merges their KV cache into the running one
(``serve.batch``). Why: a server that runs one request (or one adapter) at a
time leaves the model idle for all the others; the rollout loop (``rollout.hf.decode_batch``) already retires
finished rows, and this adds rows joining mid-flight.

Answers do not depend on the batch: positions are each row's own count of real tokens (padding is masked), and a
sampled token is drawn with the request's keyed uniform (``rollout.hf.sample_key`` of its seed and choice), so a
request alone and the same request in a full mixed batch give the same tokens (tested, greedy and seeded).

Errors are typed for the server's statuses: :class:`QueueFullError` 429, :class:`RequestLimitError` 400,
:class:`EngineStoppedError` 503, and the registry's adapter errors (``serve.adapters``).
"""

from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.rollout.hf import SamplingSettings, keyed_uniforms, sample_next_tokens
from posttrain.serve.adapters import AdapterRegistry
from posttrain.serve.batch import RunningBatch
from posttrain.serve.request import Choice, ChoiceDelta, GenerationRequest, RequestHandle, TokenLogprob


class QueueFullError(Exception):
    """``max_waiting`` requests already wait for a slot (HTTP 429)."""


class RequestLimitError(ValueError):
    """A request over the engine's limits (context length, max_tokens, n, top_logprobs) or with an invalid
    setting (HTTP 400); the message names the field."""


class EngineStoppedError(RuntimeError):
    """The engine is draining or stopped and takes no new requests (HTTP 503)."""


@dataclass
class EngineStats:
    """Counters for ``/metrics``; rows are choices being decoded."""

    waiting: int = 0
    running_rows: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished_requests: int = 0
    cancelled_requests: int = 0
    failed_requests: int = 0
    decode_steps: int = 0


class Engine:
    """Continuous batching over ``registry``'s base and adapters (module docstring). ``stop_token_ids``: what ends
    every choice (EOS and the chat template's end of turn, ``data.dataset.end_of_turn_ids``). ``max_batch_size``:
    rows (choices) decoded together; ``max_waiting``: requests queued beyond them. ``context_length`` defaults to
    the model config's ``max_position_embeddings``: a prompt plus ``max_tokens`` must fit in it.

    Drive it with :meth:`start` (a background thread) or, in tests, :meth:`step`. :meth:`submit` may load an
    adapter on demand (seconds): call it from a worker thread in an asyncio server."""

    def __init__(
        self,
        registry: AdapterRegistry,
        tokenizer: Any,
        stop_token_ids: set[int],
        max_batch_size: int = 32,
        max_waiting: int = 256,
        context_length: int | None = None,
        max_n: int = 16,
        max_top_logprobs: int = 20,
    ) -> None:
        config = registry.base_model.config
        self.registry, self.tokenizer = registry, tokenizer
        self.stop_token_ids = frozenset(int(i) for i in stop_token_ids if i is not None)
        self.max_batch_size, self.max_waiting, self.max_n = max_batch_size, max_waiting, max_n
        self.max_top_logprobs = max_top_logprobs
        self.context_length = context_length or int(config.max_position_embeddings)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stats = EngineStats()
        self._batch = RunningBatch(config, next(registry.base_model.parameters()).device)
        self._rows: list[tuple[RequestHandle, Choice]] = []  # row i of the running batch
        self._waiting: deque[RequestHandle] = deque()
        self._wakeup = threading.Condition()
        self._prefilling: list[RequestHandle] = []  # admitted, not yet rows: failed with them if the prefill fails
        self._accepting = True
        self._thread: threading.Thread | None = None

    # -- the server's side ----------------------------------------------------------------------------------
    def submit(
        self, request: GenerationRequest, on_delta: Callable[[ChoiceDelta | None], None] | None = None
    ) -> RequestHandle:
        """Queue ``request`` (checked against the limits, its adapter acquired) and return its handle."""
        self._check_limits(request)
        seed = request.seed if request.seed is not None else random.SystemRandom().getrandbits(63)
        handle = RequestHandle(request, seed, on_delta)
        with self._wakeup:
            if not self._accepting:
                raise EngineStoppedError("the server is shutting down; retry on another replica")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFullError(f"{self.max_waiting} requests are already waiting; retry later")
        self.registry.acquire(request.adapter)  # raises for unknown adapters, before anything is queued
        with self._wakeup:
            if len(self._waiting) >= self.max_waiting or not self._accepting:  # filled while the adapter loaded
                self.registry.release(request.adapter)
                raise QueueFullError(f"{self.max_waiting} requests are already waiting; retry later")
            self._waiting.append(handle)
            self.stats.waiting = len(self._waiting)
            self._wakeup.notify_all()
        return handle

    def start(self) -> None:
        """Run :meth:`step` on a background thread whenever there is work."""
        self._thread = threading.Thread(target=self._loop, name="posttrain-engine", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no more requests; with ``drain`` finish those in flight (SIGTERM), else cancel them."""
        with self._wakeup:
            self._accepting = False
            if not drain:
                for handle in [*self._waiting, *(h for h, _ in self._rows)]:
                    handle.cancel()
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._rows

    # -- one token boundary ---------------------------------------------------------------------------------
    def step(self) -> None:
        """One token boundary: drop finished and cancelled rows, decode one token for every running row (one
        forward over all adapters), then prefill the waiting requests that fit and merge them into the batch."""
        self._retire()
        newcomers = self._admit()
        with torch.no_grad(), self.registry.model_lock:
            if self._rows:
                logits = self._batch.decode(self.registry.forward, [h.request.adapter for h, _ in self._rows])
                self.stats.decode_steps += 1
                self._advance(logits, 0)
            if newcomers:
                self._prefilling = newcomers
                first_row = len(self._rows)
                prompts = [list(h.request.prompt_ids) for h in newcomers]
                names = [h.request.adapter for h in newcomers]
                copies = [h.request.n for h in newcomers]
                logits = self._batch.add(self.registry.forward, prompts, names, copies, self.pad_token_id)
                self._rows.extend((h, c) for h in newcomers for c in h.choices)
                self._prefilling = []
                self.stats.prompt_tokens += sum(len(p) for p in prompts)
                self._advance(logits, first_row)
        self._retire()

    def _admit(self) -> list[RequestHandle]:
        """Waiting requests, first come first served, while their choices fit in ``max_batch_size`` rows."""
        admitted: list[RequestHandle] = []
        free = self.max_batch_size - len(self._rows)
        with self._wakeup:
            while self._waiting:
                handle = self._waiting[0]
                if handle.cancelled:
                    self._waiting.popleft()
                    self._finish(handle)
                    continue
                if handle.request.n > free:
                    break
                self._waiting.popleft()
                admitted.append(handle)
                free -= handle.request.n
            self.stats.waiting = len(self._waiting)
        return admitted

    def _advance(self, logits: torch.Tensor, first_row: int) -> None:
        """Draw the next token of rows ``first_row ...`` from their logits, record it, stream it, and decide
        whether the choice is finished."""
        rows = self._rows[first_row : first_row + logits.shape[0]]
        tokens = self._sample(logits, rows)
        self._batch.set_next_tokens(tokens, first_row)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        for (handle, choice), token, row_log_probs in zip(rows, tokens.tolist(), log_probs):
            request = handle.request
            choice.token_ids.append(token)
            logprob = None
            if request.logprobs:
                top = row_log_probs.topk(request.top_logprobs) if request.top_logprobs else None
                alternatives = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
                logprob = TokenLogprob(token, float(row_log_probs[token]), alternatives)
                choice.logprobs.append(logprob)
            if token in self.stop_token_ids or token in request.stop_token_ids:
                choice.finish_reason = "stop"
            elif len(choice.token_ids) >= request.max_tokens:
                choice.finish_reason = "length"
            text = self._visible_text(choice, request)
            handle._emit(
                ChoiceDelta(
                    choice.index,
                    (token,),
                    text,
                    (logprob,) if logprob is not None else (),
                    choice.finish_reason,
                )
            )
        self.stats.generated_tokens += len(rows)

    def _sample(self, logits: torch.Tensor, rows: list[tuple[RequestHandle, Choice]]) -> torch.Tensor:
        """One token per row, each drawn with its own settings and keyed uniform (``rollout.hf``): the draw of
        token ``t`` of a choice depends on its seed, choice index and ``t`` only, not on the batch."""
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        groups: dict[SamplingSettings, list[int]] = {}
        for i, (handle, _) in enumerate(rows):
            r = handle.request
            settings = SamplingSettings(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
            groups.setdefault(settings, []).append(i)
        for settings, members in groups.items():
            uniform = None
            if settings.temperature > 0:
                uniform = torch.cat([keyed_uniforms([rows[i][1].key], len(rows[i][1].token_ids)) for i in members])
            index = torch.tensor(members, device=logits.device)
            tokens[index] = sample_next_tokens(logits[index], settings, uniform)
        return tokens

    def _visible_text(self, choice: Choice, request: GenerationRequest) -> str:
        """The new text of ``choice`` that is safe to show, updating ``choice.text``. Stop tokens are not text;
        a stop string ends the choice and is cut off; while the choice runs, a tail that could still become a stop
        string or is an incomplete multi-byte character (U+FFFD) is held back."""
        ids = choice.token_ids
        if (
            choice.finish_reason == "stop"
            and ids
            and (ids[-1] in self.stop_token_ids or ids[-1] in request.stop_token_ids)
        ):
            ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((at for s in request.stop if (at := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            text, choice.finish_reason = text[:cut], "stop"
        visible = len(text)
        if choice.finish_reason is None:
            held = max((k for s in request.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            visible -= held
            while visible > 0 and text[visible - 1] == "\ufffd":
                visible -= 1
        visible = max(visible, choice.emitted_chars)
        delta = text[choice.emitted_chars : visible]
        choice.text, choice.emitted_chars = text[:visible], visible
        return delta

    def _retire(self) -> None:
        """Drop rows whose choice finished or whose request was cancelled; close requests with no rows left."""
        keep = [i for i, (h, c) in enumerate(self._rows) if c.finish_reason is None and not h.cancelled]
        if len(keep) == len(self._rows):
            return
        leaving = {id(h): h for i, (h, _) in enumerate(self._rows) if i not in set(keep)}
        self._batch.keep(keep)
        self._rows = [self._rows[i] for i in keep]
        still_running = {id(h) for h, _ in self._rows}
        for key, handle in leaving.items():
            if key not in still_running:
                self._finish(handle)

    def _finish(self, handle: RequestHandle, error: BaseException | None = None) -> None:
        self.registry.release(handle.request.adapter)
        if error is not None:
            self.stats.failed_requests += 1
        elif handle.cancelled:
            self.stats.cancelled_requests += 1
        else:
            self.stats.finished_requests += 1
        handle._close(error)

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                self._wakeup.wait_for(lambda: not self.idle or not self._accepting)
                if not self._accepting and self.idle:
                    return
            try:
                self.step()
            except Exception as error:  # a failed forward fails the requests in it, never the server
                self._fail_all(error)

    def _fail_all(self, error: BaseException) -> None:
        """Fail the requests of the running batch (their cache may be half updated); the waiting ones stay."""
        handles = list({id(h): h for h, _ in self._rows}.values()) + self._prefilling
        self._rows, self._prefilling = [], []
        self._batch.reset()
        for handle in handles:
            self._finish(handle, error)

    def _check_limits(self, request: GenerationRequest) -> None:
        checks = [
            (len(request.prompt_ids) > 0, "prompt: is empty"),
            (request.max_tokens >= 1, f"max_tokens: {request.max_tokens} is below 1"),
            (
                len(request.prompt_ids) + request.max_tokens <= self.context_length,
                f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.max_tokens}) exceeds the model's "
                f"context length of {self.context_length} tokens",
            ),
            (
                1 <= request.n <= min(self.max_n, self.max_batch_size),
                f"n: {request.n} is outside 1..{min(self.max_n, self.max_batch_size)}",
            ),
            (request.temperature >= 0, f"temperature: {request.temperature} is negative"),
            (0 < request.top_p <= 1, f"top_p: {request.top_p} is outside (0, 1]"),
            (request.top_k >= 0, f"top_k: {request.top_k} is negative"),
            (
                0 <= request.top_logprobs <= self.max_top_logprobs,
                f"top_logprobs: {request.top_logprobs} is outside 0..{self.max_top_logprobs}",
            ),
            (request.logprobs or not request.top_logprobs, "top_logprobs: needs logprobs to be true"),
            (all(request.stop), "stop: empty stop strings match everywhere"),
        ]
        vocabulary = self.registry.base_model.config.vocab_size
        ids = (*request.prompt_ids, *request.stop_token_ids)
        checks.append((all(0 <= i < vocabulary for i in ids), f"token ids must lie in 0..{vocabulary - 1}"))
        for ok, message in checks:
            if not ok:
                raise RequestLimitError(message)
