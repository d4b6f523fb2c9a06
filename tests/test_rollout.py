"""Rollout engines: batched left-padded generation equals one prompt at a time, the engine interface equals the
message-level helper, and (GPU, vLLM installed) the vLLM engine samples what transformers samples and follows
the trained weights after ``sync_weights``."""

from __future__ import annotations

import pytest
import torch

from posttrain.rollout import HFEngine, SamplingSettings, render_prompt_ids, sample_responses
from posttrain.rollout.vllm import vllm_available

PROMPTS = [
    [{"role": "user", "content": "Repeat: cat"}],
    [{"role": "user", "content": "Count the words: red blue green sky sea"}],
    [{"role": "user", "content": "Add 2 and 3."}],
]


def load(micro_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(micro_model).eval(), AutoTokenizer.from_pretrained(micro_model)


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(micro_model) -> None:
    """Prompts of different lengths share one left-padded batch; greedy answers must not depend on the padding."""
    model, tokenizer = load(micro_model)
    engine = HFEngine(model, tokenizer, {tokenizer.eos_token_id}, batch_size=8)
    ids = [render_prompt_ids(tokenizer, messages) for messages in PROMPTS]
    assert len({len(i) for i in ids}) == 3  # the padding really differs
    greedy = SamplingSettings(num_samples=2, max_new_tokens=10)
    together = engine.generate(ids, greedy)
    alone = [engine.generate([i], greedy)[0] for i in ids]
    assert [[r.token_ids for r in g] for g in together] == [[r.token_ids for r in g] for g in alone]


def test_prompts_computed_once_per_group_give_the_same_answers(micro_model, monkeypatch) -> None:
    """Several samples of a prompt start from one forward of it, copied in the KV cache; greedy answers (and the
    log-probs that pick them) are those of every row computing its own prompt."""
    import posttrain.rollout.hf as hf

    model, tokenizer = load(micro_model)
    engine = HFEngine(model, tokenizer, {tokenizer.eos_token_id}, batch_size=9)
    ids = [render_prompt_ids(tokenizer, messages) for messages in PROMPTS]
    greedy = SamplingSettings(num_samples=3, max_new_tokens=10)
    built = []
    original = hf.shared_prompt_cache

    def spy(*args):
        cache = original(*args)  # generate extends it afterwards: record its shape now
        built.append((cache.get_seq_length(), cache.layers[0].keys.shape[0]) if cache is not None else None)
        return cache

    monkeypatch.setattr(hf, "shared_prompt_cache", spy)
    shared = engine.generate(ids, greedy)
    # Three prompts computed once (but their last token), copied to their nine rows.
    assert built == [(max(len(i) for i in ids) - 1, 9)]
    monkeypatch.setattr(hf, "shared_prompt_cache", lambda *args: None)
    separate = engine.generate(ids, greedy)
    assert [[r.token_ids for r in g] for g in shared] == [[r.token_ids for r in g] for g in separate]
    assert all(len(g) == 3 and g[0].token_ids == g[1].token_ids == g[2].token_ids for g in shared)


def test_engine_equals_the_message_level_helper(micro_model) -> None:
    model, tokenizer = load(micro_model)
    engine = HFEngine(model, tokenizer, {tokenizer.eos_token_id}, batch_size=4)
    torch.manual_seed(3)
    by_ids = engine.generate([render_prompt_ids(tokenizer, m) for m in PROMPTS], SamplingSettings(3, 8, temperature=1.0))
    torch.manual_seed(3)
    by_messages = sample_responses(model, tokenizer, PROMPTS, num_samples=3, max_new_tokens=8, batch_size=4, temperature=1.0)
    assert [[(r.token_ids, r.text, r.finished) for r in g] for g in by_ids] == [[(r.token_ids, r.text, r.finished) for r in g] for g in by_messages]


@pytest.mark.gpu
@pytest.mark.skipif(not vllm_available(), reason="the vLLM engine needs a CUDA GPU and vllm installed")
def test_vllm_engine_matches_transformers_and_follows_synced_weights(micro_model) -> None:
    from posttrain.rollout.vllm import VllmEngine

    model, tokenizer = load(micro_model)
    model = model.float().cuda()
    stop = {tokenizer.eos_token_id}
    hf = HFEngine(model, tokenizer, stop)
    ids = [render_prompt_ids(tokenizer, m) for m in PROMPTS]
    greedy = SamplingSettings(1, 12)
    vllm = VllmEngine(str(micro_model), stop, dtype="float32", gpu_memory_utilization=0.2)
    assert [g[0].token_ids for g in vllm.generate(ids, greedy)] == [g[0].token_ids for g in hf.generate(ids, greedy)]
    with torch.no_grad():  # a different policy: vLLM must answer like it once synced
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    vllm.sync_weights(model)
    assert [g[0].token_ids for g in vllm.generate(ids, greedy)] == [g[0].token_ids for g in hf.generate(ids, greedy)]
