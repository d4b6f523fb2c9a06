"""KL divergence of a model to a reference model along the model's own answers.

Definition (what ``kl_to_reference`` reports): for each prompt x with the model's greedy answer
y = (y_1 .. y_T) (its stop token included),

    KL(x) = sum_{t=1..T}  sum_{v in vocab}  p(v | x, y_<t) * (log p(v | x, y_<t) - log q(v | x, y_<t))

with p the model and q the reference: the exact full-vocabulary KL(p || q) of the next-token distributions at
every answer position, summed over the answer, then averaged over prompts. Unlike the sampled estimators RL
uses (k1 = log p(y_t) - log q(y_t), k3, ...; ``posttrain.rl``), it is exact per position and never negative, so
it is 0 for a model against itself and positive as soon as the two distributions differ anywhere along the
answer. Sequence-level (summed, not averaged, over tokens) because that is the KL an RLHF policy is
penalised for, which grows with answer length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from posttrain.eval.common import EvalError, device_of
from posttrain.models.modes import eval_mode
from posttrain.rollout.hf import render_prompt_ids


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """``(..., V)`` logits of p and q → ``(...)`` exact KL(p || q) per position, in float32, clamped at 0
    (the sum can come out a few ulp below zero when p ≈ q)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    logq = F.log_softmax(ref_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)


def vocab_size(model: Any) -> int:
    """Rows of the model's output layer (the size of its next-token distribution)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def check_same_vocabulary(model: Any, reference: Any, tokenizer: Any = None, reference_tokenizer: Any = None) -> None:
    """Raise EvalError unless the two models score the same token ids: same output size and, when both
    tokenizers are known, the same vocabulary."""
    sizes = vocab_size(model), vocab_size(reference)
    if sizes[0] != sizes[1]:
        raise EvalError(
            f"the model has a {sizes[0]}-token vocabulary and the reference a {sizes[1]}-token one; KL needs "
            "both to share a tokenizer (use the model this one was trained from as the reference)"
        )
    if (
        tokenizer is not None
        and reference_tokenizer is not None
        and tokenizer.get_vocab() != reference_tokenizer.get_vocab()
    ):
        raise EvalError(
            "the model and the reference have different tokenizers (same size, different tokens); KL needs both "
            "to share a tokenizer (use the model this one was trained from as the reference)"
        )


@torch.no_grad()
def answer_kls(
    model: Any, reference: Any, prompt_ids: Sequence[list[int]], answer_ids: Sequence[list[int]], batch_size: int = 16
) -> list[float]:
    """Per prompt, the summed exact KL(model || reference) over the answer's positions (module docstring).

    ``prompt_ids[i]`` is prompt i as the model saw it (chat template, generation prompt included) and
    ``answer_ids[i]`` the answer's ids; each pair runs as one right-padded sequence through both models."""
    check_same_vocabulary(model, reference)
    device, ref_device = device_of(model), device_of(reference)
    kls: list[float] = []
    with eval_mode(model, reference):
        for start in range(0, len(prompt_ids), batch_size):
            prompts, answers = prompt_ids[start : start + batch_size], answer_ids[start : start + batch_size]
            width = max(len(p) + len(a) for p, a in zip(prompts, answers))
            input_ids = torch.zeros((len(prompts), width), dtype=torch.long)
            attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
            # scored[b, t]: position t predicts an answer token (positions len(prompt)-1 .. len(prompt)+T-2).
            scored = torch.zeros((len(prompts), width), dtype=torch.bool)
            for row, (prompt, answer) in enumerate(zip(prompts, answers)):
                ids = list(prompt) + list(answer)
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
                scored[row, len(prompt) - 1 : len(ids) - 1] = True
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            ref_logits = reference(
                input_ids=input_ids.to(ref_device), attention_mask=attention_mask.to(ref_device)
            ).logits
            per_token = token_kl(logits, ref_logits.to(logits.device)) * scored.to(logits.device)
            kls += per_token.sum(-1).tolist()
    return kls


def kl_to_reference(
    model: Any,
    reference: Any,
    tokenizer: Any,
    prompts: Sequence[list[dict[str, Any]]],
    answers: Sequence[Any],
    batch_size: int = 16,
    reference_tokenizer: Any = None,
) -> float:
    """Mean over prompts of the summed full-vocabulary KL(model || reference) along the model's own answers
    (``answers``: ``rollout.hf.Response`` objects or token-id lists, one per prompt). See the module docstring
    for the definition. Both models must share ``tokenizer`` (EvalError otherwise)."""

    check_same_vocabulary(model, reference, tokenizer, reference_tokenizer)
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    prompt_ids = [render_prompt_ids(tokenizer, messages) for messages in prompts]
    answer_ids = [list(a) if isinstance(a, (list, tuple)) else list(a.token_ids) for a in answers]
    kls = answer_kls(model, reference, prompt_ids, answer_ids, batch_size)
    return sum(kls) / len(kls)
