"""Batched sampling on a transformers model: a KV cache, left padding, prompts shared by a group computed once,
and rows that leave the batch when they reach a stop token (EOS / end of turn)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.models.adapters import is_prompt_learning
from posttrain.models.modes import eval_mode


@dataclass
class Response:
    """One sampled reply. ``token_ids`` are the generated ids up to and including the stop token (no padding);
    ``finished`` says whether a stop token (EOS / end of turn) ended it, rather than ``max_new_tokens``."""

    text: str
    token_ids: list[int]
    finished: bool

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def _cut_at_stop(ids: list[int], stop_ids: set[int]) -> tuple[list[int], bool]:
    # Padding after a finished row may be the EOS itself (pad = eos is common), so only the first stop counts.
    for position, token in enumerate(ids):
        if token in stop_ids:
            return ids[: position + 1], True
    return ids, False


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample: ``temperature=0`` is greedy (``top_p``/``top_k`` then unused); ``top_k=0`` is off."""

    num_samples: int = 1
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0


def left_padded(prompts: list[list[int]], pad_token_id: int, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``prompts`` left-padded to the longest, so every prompt's last token sits
    in the last column and one KV cache serves the batch."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """The positions ``generate`` gives left-padded rows: the running count of real tokens (padding at 1)."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


def shared_prompt_cache(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_of_row: list[int]
) -> Any:
    """A KV cache holding every row's prompt but its last token, each distinct prompt computed once and copied to
    its rows (``num_samples`` copies of each prompt in a rollout); decoding then starts from the last prompt
    token. None (every row computes its own prompt) when no prompt repeats.

    Positions are what ``generate`` gives left-padded rows (the running count of real tokens), so the cache is
    the one a forward of every row would have built."""
    from transformers import DynamicCache

    if len(set(prompt_of_row)) == len(prompt_of_row) or input_ids.shape[1] < 2:
        return None
    first_row: dict[int, int] = {}
    for row, prompt in enumerate(prompt_of_row):
        first_row.setdefault(prompt, row)
    distinct = torch.tensor(list(first_row.values()), device=input_ids.device)
    ids, mask = input_ids[distinct, :-1], attention_mask[distinct, :-1]
    positions = left_padded_positions(mask)
    cache = DynamicCache(config=model.config)
    model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    slot = {prompt: i for i, prompt in enumerate(first_row)}
    cache.batch_select_indices(torch.tensor([slot[p] for p in prompt_of_row], device=input_ids.device))
    return cache


def cumulative_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """The cumulative distribution ``(B, V)`` of ``softmax(scores)`` that :func:`sample_next_tokens` inverts, in
    float64: token i is drawn with probability ``(c_i − c_{i−1}) / c_V``.

    Why float64: in float32 the running sum's ulp is 6e-8 once it passes 0.5, so every later token with p < 3e-8
    adds nothing (never drawn) and the rest are rounded to multiples of 6e-8: on a 152k vocabulary 112k–146k
    tokens could not be drawn and the draws were 1e-4 (total variation) away from the softmax whose log-probs
    PPO uses as the behaviour policy's. In float64 the ulp is 1.1e-16: a token is lost only below that, and
    all such tokens together weigh less than V·1.1e-16 (2e-11 for 152k), under float32's resolution of the
    log-probs themselves."""
    return torch.softmax(scores.double(), dim=-1).cumsum(dim=-1)


_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    """One step of SplitMix64 (Steele, Lea & Flood 2014): a bijective 64-bit mix whose outputs pass BigCrush."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def sample_key(*parts: int) -> int:
    """A 64-bit key for a stream of draws named by ``parts`` (for online RL: seed, step, prompt, sample).

    Why keys instead of a generator: a process's RNG stream depends on everything drawn before (how prompts were
    split over processes or engines, batch sizes, which process samples at all), so the same seed gave different
    samples on a different placement. A draw that is a pure function of its name is the same wherever it is made
    (counter-based generation, as in Salmon et al. 2011's Philox; JAX's keys)."""
    key = 0
    for part in parts:
        key = _splitmix64(key ^ (int(part) & _MASK64))
    return key


def keyed_uniforms(keys: list[int], position: int, device: Any = None) -> torch.Tensor:
    """``(len(keys), 1)`` float64 uniforms in [0, 1): draw ``position`` (the token's index in the response) of each
    key's stream, with 53 random bits each (float64's whole mantissa)."""
    draws = [(_splitmix64(key ^ position) >> 11) * 2.0**-53 for key in keys]
    return torch.tensor(draws, dtype=torch.float64, device=device)[:, None]


def sample_next_tokens(
    logits: torch.Tensor, settings: SamplingSettings, uniform: torch.Tensor | None = None
) -> torch.Tensor:
    """One token per row from next-token logits ``(B, V)``: the argmax when ``temperature`` is 0, otherwise a
    draw from ``softmax(logits / temperature)`` cut to the ``top_k`` most likely tokens and then to the ``top_p``
    nucleus, in that order, with transformers' own warpers (the cut ``generate`` makes).

    The draw inverts the cumulative distribution with one uniform number per row. ``torch.multinomial`` draws
    one exponential per vocabulary entry instead; on CPU that was most of a small model's sampling time, and
    with a real vocabulary (150k entries x 64 rows) it would be ~10M random numbers per token.

    ``uniform`` ``(B, 1)`` in [0, 1) (:func:`keyed_uniforms`) replaces the draw from torch's generator."""
    if settings.temperature <= 0:
        return logits.argmax(dim=-1)
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    scores = logits.float() / settings.temperature
    if settings.top_k > 0:
        scores = TopKLogitsWarper(settings.top_k)(None, scores)
    if settings.top_p < 1.0:
        scores = TopPLogitsWarper(settings.top_p)(None, scores)
    cumulative = cumulative_probabilities(scores)
    # The uniform in float64 too: float32's 2^-24 grid would hand every token of p < 6e-8 at the bottom of the CDF
    # a probability of 0 or 6e-8 instead of p.
    if uniform is None:
        uniform = torch.rand(cumulative.shape[0], 1, dtype=cumulative.dtype, device=cumulative.device)
    uniform = uniform.to(cumulative.device) * cumulative[:, -1:]
    # The first token whose cumulative probability exceeds the draw: right=True never lands on a token of
    # probability 0 (its cumulative value equals its predecessor's); the clamp covers rounding at the top end.
    return torch.searchsorted(cumulative, uniform, right=True).clamp_(max=cumulative.shape[-1] - 1).squeeze(-1)


@torch.no_grad()
def decode_batch(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: SamplingSettings,
    stop_ids: set[int],
    prompt_of_row: list[int],
    row_keys: list[int] | None = None,
) -> list[list[int]]:
    """Each left-padded row's new tokens, up to and including its first stop token, or ``max_new_tokens``.

    A row leaves the batch when it stops: its KV-cache entries are dropped (transformers'
    ``DynamicCache.batch_select_indices``) and later steps compute only the rows still going. ``generate``
    keeps every row until the last one ends, computing padding for the finished ones; with replies of mixed
    lengths (most answer in a few tokens, one runs to the limit) that padding is most of the decoding.
    Positions are ``generate``'s for left padding (the running count of real tokens), so greedy answers are
    ``generate``'s (tested). Copies of a prompt start from one forward of it (``shared_prompt_cache``).
    ``row_keys``: token ``t`` of row ``r`` is drawn with ``keyed_uniforms([row_keys[r]], t)`` instead of torch's
    generator, so a row's sample does not depend on the rows it is batched with."""
    from transformers import DynamicCache

    positions = left_padded_positions(attention_mask)
    cache = shared_prompt_cache(model, input_ids, attention_mask, prompt_of_row)
    if cache is None:
        cache, step_ids, step_positions = DynamicCache(config=model.config), input_ids, positions
    else:  # the cache holds every prompt but its last token
        step_ids, step_positions = input_ids[:, -1:], positions[:, -1:]
    mask = attention_mask
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    stop = torch.tensor(sorted(stop_ids), dtype=input_ids.dtype, device=input_ids.device)
    new_tokens: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    for position in range(settings.max_new_tokens):
        logits = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=step_positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        uniform = None
        if row_keys is not None and settings.temperature > 0:
            uniform = keyed_uniforms([row_keys[row] for row in rows.tolist()], position)
        tokens = sample_next_tokens(logits[:, -1], settings, uniform)
        for row, token in zip(rows.tolist(), tokens.tolist()):
            new_tokens[row].append(token)
        going = ~torch.isin(tokens, stop)
        if not bool(going.any()):
            break
        step_positions = step_positions[:, -1:] + 1
        if not bool(going.all()):
            keep = going.nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            rows, tokens, mask, step_positions = rows[keep], tokens[keep], mask[keep], step_positions[keep]
        step_ids = tokens[:, None]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return new_tokens


@torch.no_grad()
def generate_from_ids(
    model: Any,
    prompt_ids: list[list[int]],
    settings: SamplingSettings,
    pad_token_id: int,
    stop_token_ids: Iterable[int],
    decode_text: Any,
    batch_size: int = 32,
    prompt_keys: list[int] | None = None,
) -> list[list[Response]]:
    """``settings.num_samples`` responses to each tokenised prompt; ``result[i]`` holds prompt ``i``'s.
    ``decode_text(ids) -> str`` turns a response's ids into its text. ``prompt_keys`` (one :func:`sample_key` per
    prompt): sample ``j`` of prompt ``i`` draws from the stream ``sample_key(prompt_keys[i], j)``, so what is sampled
    does not depend on ``batch_size``, on the other prompts, or on the process; without them torch's generator
    draws.

    Each prompt is repeated ``num_samples`` times in the flat stream, so ``batch_size`` bounds the sequences per
    batch whatever ``num_samples`` is. Left padding keeps every prompt's last token at the same position so one
    batch with one KV cache serves all (:func:`decode_batch`). Every sampling setting is explicit, so the checkpoint's
    ``generation_config.json`` (often ``do_sample: true`` with its own temperature) cannot change what was asked
    for. peft prompt learning goes through ``generate``, which inserts its virtual tokens."""

    stop_ids = {int(i) for i in stop_token_ids if i is not None}
    flat = [index for index in range(len(prompt_ids)) for _ in range(settings.num_samples)]
    keys = None
    if prompt_keys is not None:
        keys = [
            sample_key(prompt_keys[index], j) for index in range(len(prompt_ids)) for j in range(settings.num_samples)
        ]
    through_generate = is_prompt_learning(model)
    device = next(model.parameters()).device
    grouped: list[list[Response]] = [[] for _ in prompt_ids]
    with eval_mode(model):
        for start in range(0, len(flat), batch_size):
            chunk = flat[start : start + batch_size]
            chunk_keys = keys[start : start + batch_size] if keys is not None else None
            input_ids, attention_mask = left_padded([prompt_ids[i] for i in chunk], pad_token_id, device)
            if through_generate:
                new_tokens = _generate(model, input_ids, attention_mask, settings, pad_token_id, stop_ids, chunk_keys)
            else:
                new_tokens = decode_batch(model, input_ids, attention_mask, settings, stop_ids, chunk, chunk_keys)
            for index, ids in zip(chunk, new_tokens):
                kept, finished = _cut_at_stop(ids, stop_ids)
                grouped[index].append(Response(decode_text(kept), kept, finished))
    return grouped


def _generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: SamplingSettings,
    pad_token_id: int,
    stop_ids: set[int],
    row_keys: list[int] | None = None,
) -> list[list[int]]:
    """transformers ``generate`` (for peft prompt learning): the new ids of each row, padding included. With
    ``row_keys`` the draw is :class:`KeyedDraw`'s and ``generate`` decodes greedily over what it leaves."""
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
        if settings.temperature > 0
        else {"do_sample": False}
    )
    if row_keys is not None and settings.temperature > 0:
        from transformers import LogitsProcessorList

        keyed = KeyedDraw(row_keys, settings, input_ids.shape[1])
        sampling = {"do_sample": False, "logits_processor": LogitsProcessorList([keyed])}
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=pad_token_id,
        eos_token_id=sorted(stop_ids),
        **sampling,
    )
    return output[:, input_ids.shape[1] :].tolist()


class KeyedDraw:
    """A transformers logits processor that makes ``sample_next_tokens``' keyed draw inside ``generate``: it leaves
    only the drawn token finite, so greedy decoding takes it (``generate``'s own sampling draws from torch's
    generator, which :func:`sample_key` exists to avoid). ``generate`` keeps every row to the end, so row ``r`` of
    the batch is always key ``r``, and the position is the number of tokens past the prompt width."""

    def __init__(self, row_keys: list[int], settings: SamplingSettings, prompt_width: int) -> None:
        self.row_keys, self.settings, self.prompt_width = row_keys, settings, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        uniform = keyed_uniforms(self.row_keys, input_ids.shape[1] - self.prompt_width)
        tokens = sample_next_tokens(scores, self.settings, uniform)
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(1, tokens[:, None], 0.0)


def render_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """A prompt's token ids as the chat template renders it with the generation prompt appended."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sample_responses(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict[str, Any]]],
    num_samples: int = 1,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_token_ids: Iterable[int] | None = None,
) -> list[list[Response]]:
    """``num_samples`` replies to each prompt (a message list), rendered with the tokenizer's chat template;
    ``result[i]`` holds prompt ``i``'s replies (:func:`generate_from_ids`). Generation stops at any of
    ``stop_token_ids`` (default: the tokenizer's EOS); pass the template's end-of-turn ids too
    (``data.dataset.end_of_turn_ids``)."""
    stop_ids = set(stop_token_ids) if stop_token_ids is not None else {tokenizer.eos_token_id}
    settings = SamplingSettings(num_samples, max_new_tokens, temperature, top_p, top_k)
    return generate_from_ids(
        model,
        [render_prompt_ids(tokenizer, messages) for messages in prompts],
        settings,
        tokenizer.pad_token_id,
        stop_ids,
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip(),
        batch_size,
    )


class HFEngine:
    """The default rollout engine: the policy itself generates (``generate_from_ids``), so there are no weights
    to sync."""

    def __init__(self, model: Any, tokenizer: Any, stop_token_ids: Iterable[int], batch_size: int = 32) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.stop_token_ids = set(stop_token_ids)

    def generate(
        self, prompt_ids: list[list[int]], settings: SamplingSettings, prompt_keys: list[int] | None = None
    ) -> list[list[Response]]:
        return generate_from_ids(
            self.model,
            prompt_ids,
            settings,
            self.tokenizer.pad_token_id,
            self.stop_token_ids,
            lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True).strip(),
            self.batch_size,
            prompt_keys,
        )

    def sync_weights(self, model: Any) -> None:
        """Nothing to do: generation runs on the trained module itself."""
