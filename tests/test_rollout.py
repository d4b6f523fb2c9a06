"""Rollout engines: batched left-padded generation equals one prompt at a time and transformers ``generate``,
rows that stop leave the batch, draws follow the temperature / top-k / top-p distribution, the engine interface
equals the message-level helper, and (GPU, vLLM installed) the vLLM engine samples what transformers samples and
follows the trained weights after ``sync_weights``."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.rollout import HFEngine, SamplingSettings, render_prompt_ids, sample_responses
from posttrain.rollout.hf import keyed_uniforms, sample_key, sample_next_tokens
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


def test_rows_that_stop_leave_the_batch_and_answers_equal_generate(micro_model) -> None:
    """Greedy answers equal transformers ``generate`` (left padding, repeated prompts, two stop ids), while each
    decoding forward computes only the rows still going: its batch is the number of answers longer than the
    step (after one forward of the three distinct prompts)."""
    model, tokenizer = load(micro_model)
    torch.manual_seed(0)
    with torch.no_grad():  # the untrained micro model answers one token over and over: make answers differ
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    ids = [render_prompt_ids(tokenizer, messages) for messages in PROMPTS]
    greedy = SamplingSettings(num_samples=2, max_new_tokens=12)
    # A second stop token: one that the first prompt's greedy answer emits after a few tokens, so its rows stop
    # early while the others run on.
    first = HFEngine(model, tokenizer, {tokenizer.eos_token_id}).generate(ids[:1], greedy)[0][0].token_ids
    stop = {tokenizer.eos_token_id, first[3]}
    batch_sizes: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        answers = [
            r.token_ids for g in HFEngine(model, tokenizer, stop, batch_size=6).generate(ids, greedy) for r in g
        ]
    finally:
        hook.remove()
    width = max(len(i) for i in ids)
    padded = torch.tensor([[tokenizer.pad_token_id] * (width - len(i)) + i for i in ids for _ in range(2)])
    output = model.generate(
        input_ids=padded,
        attention_mask=(padded != tokenizer.pad_token_id).long(),
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=sorted(stop),
    )
    expected = []
    for row in output[:, width:].tolist():
        cut = next((i for i, token in enumerate(row) if token in stop), len(row) - 1)
        expected.append(row[: cut + 1])
    assert answers == expected
    lengths = [len(a) for a in answers]
    assert min(lengths) < max(lengths) == 12  # some rows stopped early, some ran to the limit
    assert batch_sizes == [3] + [sum(length > step for length in lengths) for step in range(max(lengths))]


def test_prompt_tuning_generates_through_transformers(micro_model) -> None:
    """peft prompt learning inserts its virtual tokens inside ``generate``: the engine answers what the peft
    model's own ``generate`` does (and not what the bare base model would)."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    base, tokenizer = load(micro_model)
    torch.manual_seed(0)
    model = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # virtual tokens far from the vocabulary's, to change the answers
            parameter.add_(torch.randn_like(parameter) * 0.5)
    ids = render_prompt_ids(tokenizer, PROMPTS[1])
    answer = (
        HFEngine(model, tokenizer, {tokenizer.eos_token_id}).generate([ids], SamplingSettings(1, 8))[0][0].token_ids
    )
    prompt = torch.tensor([ids])
    expected = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id],
    )
    assert answer == expected[0, len(ids) :].tolist()[: len(answer)]
    with model.disable_adapter():
        bare = (
            HFEngine(model, tokenizer, {tokenizer.eos_token_id})
            .generate([ids], SamplingSettings(1, 8))[0][0]
            .token_ids
        )
    assert bare != answer


def test_draws_follow_the_temperature_top_k_top_p_distribution() -> None:
    """200,000 draws from one row of logits: frequencies match the hand-derived probabilities within 5 standard
    errors, and tokens outside the cut (or of probability 0) are never drawn."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -math.inf])
    draws = 200_000

    def frequencies(settings: SamplingSettings) -> list[float]:
        torch.manual_seed(0)
        tokens = sample_next_tokens(logits.expand(draws, -1), settings)
        return (torch.bincount(tokens, minlength=6).double() / draws).tolist()

    def assert_close(observed: list[float], weights: list[float]) -> None:
        expected = [w / sum(weights) for w in weights]
        for got, want in zip(observed, expected):
            assert abs(got - want) <= 5 * math.sqrt(want * (1 - want) / draws) + 1e-12, (observed, expected)

    e = math.exp
    # Temperature 1: softmax of the logits, the -inf token never.
    assert_close(frequencies(SamplingSettings(temperature=1.0)), [e(2), e(1), e(0.5), 1.0, e(-1), 0.0])
    # Temperature 0.5 doubles the logits.
    assert_close(frequencies(SamplingSettings(temperature=0.5)), [e(4), e(2), e(1), 1.0, e(-2), 0.0])
    # Top-k 2 keeps the two most likely tokens, renormalised.
    assert_close(frequencies(SamplingSettings(temperature=1.0, top_k=2)), [e(2), e(1), 0, 0, 0, 0])
    # Top-p 0.8: probabilities .563, .207, .126, ... reach 0.8 only with the third token.
    total = e(2) + e(1) + e(0.5) + 1.0 + e(-1)
    assert e(2) / total + e(1) / total < 0.8 < (e(2) + e(1) + e(0.5)) / total
    assert_close(frequencies(SamplingSettings(temperature=1.0, top_p=0.8)), [e(2), e(1), e(0.5), 0, 0, 0])
    # Temperature 0 is the argmax, whatever the other settings.
    assert frequencies(SamplingSettings(temperature=0.0, top_k=3)) == [1.0, 0, 0, 0, 0, 0]


def test_every_token_of_a_large_vocabulary_can_be_drawn(monkeypatch) -> None:
    """On a Qwen2-sized vocabulary (151,936), the distribution the sampler's inverse CDF implies,
    ``(c_i − c_{i−1}) / c_V`` for the cumulative values ``c`` it searches, is the softmax within a total variation
    of 1e-6 (float32 gave 1.6e-4 to 6.5e-4) and gives every token of positive probability a non-empty interval
    (float32 left 112k-146k tokens undrawable); the uniform it searches for is float64, whose 2^-53 grid resolves
    those intervals. Rows: spread logits (σ = 3: smallest probabilities ~1e-13) and one peaked on a token.
    The CDF is read where the sampler uses it (``torch.searchsorted``), so the test pins the draw itself."""
    vocab = 151_936
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, vocab, generator=generator) * 3
    logits[1, 1234] += 20.0
    seen: dict[str, torch.Tensor] = {}
    searchsorted = torch.searchsorted

    def recording(sorted_sequence: torch.Tensor, values: torch.Tensor, **kwargs: object) -> torch.Tensor:
        seen["cdf"], seen["uniform"] = sorted_sequence, values
        return searchsorted(sorted_sequence, values, **kwargs)

    monkeypatch.setattr(torch, "searchsorted", recording)
    tokens = sample_next_tokens(logits, SamplingSettings(temperature=1.0))
    assert tokens.shape == (2,) and int(tokens.max()) < vocab
    cdf = seen["cdf"].double()
    implied = torch.diff(cdf, dim=-1, prepend=torch.zeros_like(cdf[:, :1])) / cdf[:, -1:]
    softmax = torch.softmax(logits.double(), dim=-1)
    assert float(softmax.min()) > 0
    total_variation = 0.5 * (implied - softmax).abs().sum(dim=-1)
    assert float(total_variation.max()) < 1e-6, total_variation
    undrawable = int((implied[softmax > 0] <= 0).sum())
    assert undrawable == 0, f"{undrawable} tokens of positive probability can never be drawn"
    assert seen["uniform"].dtype == torch.float64


def test_keyed_uniforms_are_uniform_and_a_pure_function_of_the_key() -> None:
    """The keyed draws: the same (key, position) gives the same number in any call; 100,000 of them are uniform
    (every decile within 5 standard errors of 10 %, mean within 5 of 0.5); and SplitMix64's first outputs from
    seed 0 are the published ones (Vigna's reference C), so the mix is the real one."""
    from posttrain.rollout.hf import _splitmix64

    state, outputs = 0, []
    for _ in range(3):  # the reference generator adds the golden gamma to its state, then mixes
        outputs.append(_splitmix64(state))
        state = (state + 0x9E3779B97F4A7C15) & ((1 << 64) - 1)
    assert outputs == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    keys = [sample_key(7, 3, prompt, sample) for prompt in range(1000) for sample in range(4)]
    assert len(set(keys)) == len(keys)
    first = keyed_uniforms(keys[:5], 9)
    assert torch.equal(first, keyed_uniforms(keys[:5], 9))
    assert torch.equal(first[2], keyed_uniforms(keys[2:3], 9)[0])  # a key's draw ignores its neighbours
    assert not torch.equal(first, keyed_uniforms(keys[:5], 10))
    draws = torch.cat([keyed_uniforms(keys, position) for position in range(25)]).squeeze(1)
    n = draws.numel()
    assert float(draws.min()) >= 0.0 and float(draws.max()) < 1.0
    assert abs(float(draws.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / n)
    deciles = torch.bincount((draws * 10).long(), minlength=10).double() / n
    assert float((deciles - 0.1).abs().max()) < 5 * math.sqrt(0.09 / n)


def test_keyed_samples_do_not_depend_on_batching_or_on_the_other_prompts(micro_model) -> None:
    """With prompt keys, a prompt's samples are a function of its key alone: the same whether it is sampled with
    the other prompts at batch size 8, alone at batch size 1, or after torch's generator moved; another key
    gives other samples. Prompt learning (through ``generate``) draws the same keyed samples."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    model, tokenizer = load(micro_model)
    ids = [render_prompt_ids(tokenizer, messages) for messages in PROMPTS]
    keys = [sample_key(0, 5, index) for index in range(len(ids))]
    hot = SamplingSettings(num_samples=3, max_new_tokens=8, temperature=3.0)  # hot: the samples differ
    engine = HFEngine(model, tokenizer, {tokenizer.eos_token_id}, batch_size=8)
    together = engine.generate(ids, hot, keys)
    torch.manual_seed(123)
    one_by_one = HFEngine(model, tokenizer, {tokenizer.eos_token_id}, batch_size=1)
    alone = [one_by_one.generate([i], hot, [k])[0] for i, k in zip(ids, keys)]
    tokens = [[r.token_ids for r in group] for group in together]
    assert tokens == [[r.token_ids for r in group] for group in alone]
    assert len({tuple(t) for t in tokens[1]}) > 1  # the samples of a prompt differ from each other
    other = engine.generate(ids, hot, [sample_key(0, 6, index) for index in range(len(ids))])
    assert [[r.token_ids for r in group] for group in other] != tokens

    torch.manual_seed(0)
    tuned = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)).eval()
    tuned_engine = HFEngine(tuned, tokenizer, {tokenizer.eos_token_id}, batch_size=8)
    first = tuned_engine.generate(ids[:2], hot, keys[:2])
    again = HFEngine(tuned, tokenizer, {tokenizer.eos_token_id}, batch_size=1).generate(ids[1:2], hot, keys[1:2])
    assert [r.token_ids for r in first[1]] == [r.token_ids for r in again[0]]


def test_engine_equals_the_message_level_helper(micro_model) -> None:
    model, tokenizer = load(micro_model)
    engine = HFEngine(model, tokenizer, {tokenizer.eos_token_id}, batch_size=4)
    torch.manual_seed(3)
    by_ids = engine.generate(
        [render_prompt_ids(tokenizer, m) for m in PROMPTS], SamplingSettings(3, 8, temperature=1.0)
    )
    torch.manual_seed(3)
    by_messages = sample_responses(
        model, tokenizer, PROMPTS, num_samples=3, max_new_tokens=8, batch_size=4, temperature=1.0
    )
    assert [[(r.token_ids, r.text, r.finished) for r in g] for g in by_ids] == [
        [(r.token_ids, r.text, r.finished) for r in g] for g in by_messages
    ]


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


def test_the_vllm_engine_is_refused_in_one_line_without_a_gpu(micro_model, toy, tmp_path, capsys) -> None:
    """``sampling.engine=vllm`` on a machine without CUDA (or without vLLM): exit 2 and one line that says what
    it needs, before any sampling; vLLM settings without the vLLM engine are refused as doing nothing."""
    from posttrain.cli import main

    if vllm_available():
        pytest.skip("this machine can run vLLM: the refusal is for machines that cannot")
    data = tmp_path / "p.jsonl"
    data.write_text("".join(toy.prompts.read_text().splitlines(keepends=True)[:8]))
    base = ["train", "posttrain/configs/grpo.yaml", f"model.path={micro_model}", f"data.train={data}"]
    assert main([*base, f"output_dir={tmp_path / 'run'}", "sampling.engine=vllm"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == (
        "error: sampling.engine=vllm needs a CUDA GPU and vLLM (pip install 'posttrain[vllm]'); use sampling.engine=hf"
    )
    assert main([*base, f"output_dir={tmp_path / 'run2'}", "sampling.vllm.sleep=true"]) == 2
    assert (
        "sampling.vllm configures the vLLM engine; it does nothing with sampling.engine=hf" in capsys.readouterr().err
    )


@pytest.mark.gpu
@pytest.mark.skipif(not vllm_available(), reason="the vLLM engine needs a CUDA GPU and vllm installed")
def test_vllm_engine_syncs_a_lora_adapter_only_and_sleeps_between_rollouts(micro_model) -> None:
    """A LoRA policy: vLLM serves the base with the synced adapter as a LoRA request, answering (greedy) as the
    peft model does after its adapter moved; with sleep on, the engine sleeps after each call and wakes for the
    next, answering the same."""
    from peft import LoraConfig, get_peft_model

    from posttrain.rollout.vllm import VllmEngine

    base, tokenizer = load(micro_model)
    model = get_peft_model(base.float().cuda(), LoraConfig(r=8, target_modules="all-linear")).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    stop = {tokenizer.eos_token_id}
    hf = HFEngine(model, tokenizer, stop)
    ids = [render_prompt_ids(tokenizer, m) for m in PROMPTS]
    greedy = SamplingSettings(1, 12)
    engine = VllmEngine(str(micro_model), stop, dtype="float32", gpu_memory_utilization=0.2, sleep=True, lora_rank=8)
    engine.sync_weights(model)
    assert engine.lora_request is not None and engine.asleep
    expected = [g[0].token_ids for g in hf.generate(ids, greedy)]
    assert [g[0].token_ids for g in engine.generate(ids, greedy)] == expected
    assert engine.asleep
    assert [g[0].token_ids for g in engine.generate(ids, greedy)] == expected
