"""Batched sampling with transformers ``generate`` (KV cache, left padding, stop at EOS / end of turn)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch


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


def shared_prompt_cache(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_of_row: list[int]) -> Any:
    """A KV cache holding every row's prompt but its last token, each distinct prompt computed once and copied to
    its rows (``num_samples`` copies of each prompt in a rollout); ``generate`` then starts from the last prompt
    token. None (``generate`` computes every row's prompt itself) when no prompt repeats, or for peft prompt
    learning, whose virtual tokens ``generate`` inserts itself.

    Positions are what ``generate`` gives left-padded rows (the running count of real tokens), so the cache is
    the one ``generate`` would have built."""
    from transformers import DynamicCache

    from posttrain.models.adapters import is_prompt_learning

    if len(set(prompt_of_row)) == len(prompt_of_row) or input_ids.shape[1] < 2 or is_prompt_learning(model):
        return None
    first_row: dict[int, int] = {}
    for row, prompt in enumerate(prompt_of_row):
        first_row.setdefault(prompt, row)
    distinct = torch.tensor(list(first_row.values()), device=input_ids.device)
    ids, mask = input_ids[distinct, :-1], attention_mask[distinct, :-1]
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
    slot = {prompt: i for i, prompt in enumerate(first_row)}
    cache.batch_select_indices(torch.tensor([slot[p] for p in prompt_of_row], device=input_ids.device))
    return cache


@torch.no_grad()
def generate_from_ids(
    model: Any,
    prompt_ids: list[list[int]],
    settings: SamplingSettings,
    pad_token_id: int,
    stop_token_ids: Iterable[int],
    decode: Any,
    batch_size: int = 32,
) -> list[list[Response]]:
    """``settings.num_samples`` responses to each tokenised prompt with transformers ``generate``;
    ``result[i]`` holds prompt ``i``'s. ``decode(ids) -> str`` turns a response's ids into its text.

    Each prompt is repeated ``num_samples`` times in the flat stream, so ``batch_size`` bounds the sequences per
    ``generate`` call whatever ``num_samples`` is; the copies of a prompt in one call share its forward
    (``shared_prompt_cache``). Left padding keeps every prompt's last token at the same
    position so one batched ``generate`` (with its KV cache) serves all. Every sampling setting is passed
    explicitly so the checkpoint's ``generation_config.json`` (often ``do_sample: true`` with its own temperature)
    cannot change what was asked for."""
    stop_ids = {int(i) for i in stop_token_ids if i is not None}
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
        if settings.temperature > 0
        else {"do_sample": False}
    )
    flat = [index for index in range(len(prompt_ids)) for _ in range(settings.num_samples)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    grouped: list[list[Response]] = [[] for _ in prompt_ids]
    try:
        for start in range(0, len(flat), batch_size):
            chunk = flat[start : start + batch_size]
            width = max(len(prompt_ids[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, index in enumerate(chunk):
                ids = prompt_ids[index]
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                past_key_values=shared_prompt_cache(model, input_ids, attention_mask, chunk),
                max_new_tokens=settings.max_new_tokens,
                pad_token_id=pad_token_id,
                eos_token_id=sorted(stop_ids),
                **sampling,
            )
            for index, ids in zip(chunk, output[:, width:].tolist()):
                kept, finished = _cut_at_stop(ids, stop_ids)
                grouped[index].append(Response(decode(kept), kept, finished))
    finally:
        model.train(was_training)
    return grouped


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
        model, [render_prompt_ids(tokenizer, messages) for messages in prompts], settings, tokenizer.pad_token_id,
        stop_ids, lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip(), batch_size,
    )


class HFEngine:
    """The default rollout engine: the policy itself generates (``generate_from_ids``), so there are no weights
    to sync."""

    def __init__(self, model: Any, tokenizer: Any, stop_token_ids: Iterable[int], batch_size: int = 32) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.stop_token_ids = set(stop_token_ids)

    def generate(self, prompt_ids: list[list[int]], settings: SamplingSettings) -> list[list[Response]]:
        return generate_from_ids(
            self.model, prompt_ids, settings, self.tokenizer.pad_token_id, self.stop_token_ids,
            lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True).strip(), self.batch_size,
        )

    def sync_weights(self, model: Any) -> None:
        """Nothing to do: generation runs on the trained module itself."""


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
) -> list[str]:
    """The assistant's reply text to each prompt: one sample each from :func:`sample_responses`."""
    groups = sample_responses(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
        temperature=temperature, top_p=top_p, top_k=top_k,
    )
    return [group[0].text for group in groups]
