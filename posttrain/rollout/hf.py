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


@torch.no_grad()
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
    ``result[i]`` holds prompt ``i``'s replies.

    Each prompt is repeated ``num_samples`` times in the flat batch stream, so ``batch_size`` bounds the
    sequences per ``generate`` call whatever ``num_samples`` is. Left padding keeps every prompt's last token at
    the same position so one batched ``generate`` (with its KV cache) serves all. ``temperature=0`` is greedy
    decoding, and ``top_p``/``top_k`` are then unused; ``top_k=0`` turns top-k off. Every sampling setting is
    passed explicitly so the checkpoint's ``generation_config.json`` (often ``do_sample: true`` with its own
    temperature) cannot change what was asked for. Generation stops at any of ``stop_token_ids`` (default: the
    tokenizer's EOS); pass the template's end-of-turn ids too (``data.dataset.end_of_turn_ids``).
    """
    stop_ids = set(stop_token_ids) if stop_token_ids is not None else {tokenizer.eos_token_id}
    stop_ids.discard(None)  # type: ignore[arg-type]
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
        if temperature > 0
        else {"do_sample": False}
    )
    flat = [(index, messages) for index, messages in enumerate(prompts) for _ in range(num_samples)]
    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    grouped: list[list[Response]] = [[] for _ in prompts]
    try:
        for start in range(0, len(flat), batch_size):
            chunk = flat[start : start + batch_size]
            texts = [tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) for _, messages in chunk]
            encoded = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True).to(device)
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=sorted(stop_ids),
                **sampling,
            )
            new_tokens = output[:, encoded["input_ids"].shape[1] :].tolist()
            for (index, _), ids in zip(chunk, new_tokens):
                kept, finished = _cut_at_stop(ids, stop_ids)
                text = tokenizer.decode(kept, skip_special_tokens=True).strip()
                grouped[index].append(Response(text, kept, finished))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return grouped


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
