"""Batched sampling with transformers ``generate`` (KV cache, left padding, stop at EOS / end of turn)."""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> list[str]:
    """The assistant's reply to each prompt (a message list), rendered with the model's chat template.

    Left padding keeps every prompt's last token at the same position so one batched ``generate`` serves all;
    ``temperature=0`` is greedy decoding.
    """
    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    replies: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [
                tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                for p in prompts[start : start + batch_size]
            ]
            encoded = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True).to(device)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            replies += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return [reply.strip() for reply in replies]
