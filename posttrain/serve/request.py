"""A request to the serving engine and its answer as it grows: what to generate (:class:`GenerationRequest`), the
choices, the stream of deltas a server turns into SSE chunks, cancellation, and the timings for latency metrics."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from posttrain.rollout.hf import sample_key


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. ``adapter`` None is the base model; ``temperature`` 0 is greedy; ``top_k`` 0 is off;
    ``stop_token_ids`` add to the engine's own (EOS, end of turn); ``stop`` strings end a choice and are cut from
    its text; ``seed`` None draws a fresh one (each request still samples from its own keyed stream);
    ``top_logprobs``: how many alternatives to report with each token's log-prob (``logprobs`` must be on)."""

    prompt_ids: tuple[int, ...]
    adapter: str | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-prob under the model (``log_softmax`` of its logits, before temperature and
    top-p/top-k: what the model assigns, as OpenAI and vLLM report) and the ``top`` most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class ChoiceDelta:
    """What one choice gained at a token boundary: its new tokens, the text they completed (withheld while it
    could still be the start of a stop string or an incomplete character), and ``finish_reason`` ("stop" or
    "length") on its last delta."""

    index: int
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None


@dataclass
class Choice:
    """One of a request's ``n`` answers as it grows. ``token_ids`` include the stop token (they count as
    completion tokens); ``text`` excludes stop tokens and stop strings."""

    index: int
    key: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    emitted_chars: int = 0


class RequestHandle:
    """A submitted request: its choices as they grow, a thread-safe stream of :class:`ChoiceDelta` (``deltas()``,
    or the ``on_delta`` callback given to :meth:`Engine.submit`, called on the engine thread: keep it short, e.g.
    ``loop.call_soon_threadsafe``), :meth:`cancel`, and timings for latency metrics (``time.monotonic``)."""

    def __init__(self, request: GenerationRequest, seed: int, on_delta: Callable[[ChoiceDelta | None], None] | None):
        self.request, self.seed = request, seed
        self.choices = [Choice(i, sample_key(seed, i)) for i in range(request.n)]
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.error: BaseException | None = None
        self._events: queue.Queue[ChoiceDelta | None] = queue.Queue()
        self._on_delta = on_delta
        self._cancelled = threading.Event()
        self._done = threading.Event()

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """The client is gone: the engine frees the request's rows at the next token boundary."""
        self._cancelled.set()

    def wait(self, timeout: float | None = None) -> list[Choice]:
        """Block until every choice finished; raise what failed the request, TimeoutError past ``timeout``."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request not finished within {timeout} s")
        if self.error is not None:
            raise self.error
        return self.choices

    def deltas(self, timeout: float | None = None) -> Iterator[ChoiceDelta]:
        """The request's deltas in order, until it ends (raises what failed it)."""
        while (delta := self._events.get(timeout=timeout)) is not None:
            yield delta
        if self.error is not None:
            raise self.error

    def _emit(self, delta: ChoiceDelta) -> None:
        if self.first_token_at is None and delta.token_ids:
            self.first_token_at = time.monotonic()
        self._events.put(delta)
        if self._on_delta is not None:
            self._on_delta(delta)

    def _close(self, error: BaseException | None = None) -> None:
        self.error, self.finished_at = error, time.monotonic()
        self._done.set()
        self._events.put(None)
        if self._on_delta is not None:
            self._on_delta(None)
