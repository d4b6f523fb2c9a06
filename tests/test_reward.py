"""The reward-model recipe: where the reward is read, what the loss sees, and that the output scores what it learnt.

- the reward is the head's value at each sequence's last real token, the same for right-padded, left-padded and
  packed batches, and equal to transformers' own pooling where that pooling is right (pad token ≠ EOS);
- grad accumulation 1×8 == 8×1, packed == padded;
- pair margins enter the loss (Llama 2);
- LoRA reward models save the head and load back as a scorer with the same scores; ``posttrain score`` works;
- a learning test: held-out accuracy on the toy's verifiable preference pairs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_weights_close, sft_config
from safetensors.torch import load_file
from torch.testing import assert_close

from posttrain.config import DataConfig
from posttrain.data.formats import read_records
from posttrain.data.packing import collate
from posttrain.data.pairs import pair_rows, tokenize_preferences
from posttrain.eval.reward_model import RewardScorer
from posttrain.models.loading import load_scorer_model
from posttrain.models.scalar_head import last_token_index
from posttrain.recipes import reward
from posttrain.recipes.reward import pair_rewards


def reward_config(model: Path, data: Path, out: Path, **overrides):
    defaults = dict(stage="reward", data__max_length=64, optim__lr=1e-3)
    return sft_config(model, data, out, **{**defaults, **overrides})


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_last_token_index_left_and_right_padding() -> None:
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]


@pytest.fixture(scope="module")
def reward_dir(micro_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained reward model (micro Llama + a random scalar head), saved as a reward run's model/ would be."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(micro_model, num_labels=1)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # a visible head, so positions matter in the comparison
    path = tmp_path_factory.mktemp("rm") / "model"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(micro_model).save_pretrained(path)
    return path


def test_reward_is_read_at_the_last_token_for_any_padding_and_packing(toy, reward_dir: Path) -> None:
    scorer, tokenizer = load_scorer_model(reward_dir)
    records = read_records(toy.prefs, kind="preference").records[:8]
    pairs, dropped = tokenize_preferences(
        type("R", (), {"records": records, "source": str(toy.prefs)})(),
        tokenizer,
        DataConfig(train="x", max_length=64),
    )
    assert dropped == 0 and len({len(p.chosen.input_ids) for p in pairs}) > 1, "different lengths make padding matter"
    ids = [side.input_ids for pair in pairs for side in (pair.chosen, pair.rejected)]

    def scores(padding_side: str) -> torch.Tensor:
        tokenizer.padding_side = padding_side
        batch = tokenizer.pad([{"input_ids": i} for i in ids], return_tensors="pt")
        with torch.no_grad():
            values = scorer(batch["input_ids"], attention_mask=batch["attention_mask"])
            hf_pooled = scorer.model(**batch).logits.squeeze(-1)  # transformers' own pooling (pad ≠ EOS here)
        ours = values[torch.arange(len(ids)), last_token_index(batch["attention_mask"])]
        assert_close(ours, hf_pooled, rtol=1e-5, atol=1e-5)
        return ours

    right, left = scores("right"), scores("left")
    assert_close(right, left, rtol=1e-4, atol=1e-5)
    assert right.std() > 0.05, "a constant reward would hide a wrong position"
    for packed in (False, True):
        data = DataConfig(train="x", max_length=64, packing=packed)
        rows = pair_rows(pairs, data, seed=0)
        assert packed == (len(rows) < len(pairs))
        with torch.no_grad():
            rewards, index = pair_rewards(scorer, collate(rows, tokenizer.pad_token_id, packed=packed))
        expected = right.view(-1, 2)[index]
        assert_close(rewards, expected, rtol=1e-4, atol=1e-5)
    # The scorer API (the chat template, then the same tokenisation) agrees with the training layout.
    tokenizer.padding_side = "left"
    api = RewardScorer(reward_dir, device="cpu")
    api.tokenizer.padding_side = "left"
    conversations = [r.prompt + side for r in records for side in (r.chosen, r.rejected)]
    assert_close(torch.tensor(api.score(conversations)), right, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("packing", [False, True])
def test_reward_grad_accumulation_1x8_equals_8x1(toy, micro_model, tmp_path, packing) -> None:
    # SGD without clipping: a clipped update has a fixed norm, blind to a wrongly scaled gradient.
    common = dict(
        train__max_steps=3, data__packing=packing, optim__name="sgd", optim__lr=0.5, optim__max_grad_norm=None
    )
    # Padded rows hold one pair each; packed rows several, so the 8-row micro-batch is split in 8 differently.
    a = reward_config(micro_model, toy.prefs, tmp_path / "a", train__batch_size=8, train__grad_accum=1, **common)
    b = reward_config(micro_model, toy.prefs, tmp_path / "b", train__batch_size=1, train__grad_accum=8, **common)
    reward.run(a)
    reward.run(b)
    losses_a = [m["loss"] for m in _metrics(tmp_path / "a") if "loss" in m]
    losses_b = [m["loss"] for m in _metrics(tmp_path / "b") if "loss" in m]
    assert len(losses_a) == 3
    assert_close(torch.tensor(losses_a), torch.tensor(losses_b), rtol=1e-5, atol=0)
    weights_a = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    weights_b = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert "score.weight" in weights_a
    assert_weights_close(weights_b, weights_a, load_file(str(micro_model / "model.safetensors")))


@pytest.mark.parametrize("share_prompt", [True, False])
def test_reward_packed_equals_padded_training(toy, micro_model, tmp_path, share_prompt) -> None:
    """One SGD step over every pair (``train.batch_size`` counts pairs, packed or padded): packed rows (with each
    pair's prompt held once, or twice) and padded rows give the same loss and the same weights."""
    from transformers import AutoTokenizer

    from posttrain.data.pairs import load_pairs

    common = dict(train__max_steps=1, optim__name="sgd", optim__lr=0.5, optim__max_grad_norm=None)
    padded = reward_config(micro_model, toy.prefs, tmp_path / "padded", data__packing=False, **common)
    pairs = load_pairs(padded.data, AutoTokenizer.from_pretrained(micro_model), padded.seed).train
    packed_rows = len(pair_rows(pairs, padded.data.model_copy(update={"packing": True}), padded.seed, share_prompt))
    assert packed_rows < len(pairs), "packing must change the layout for this test to bite"
    padded = padded.model_copy(update={"train": padded.train.model_copy(update={"batch_size": len(pairs)})})
    packed = reward_config(
        micro_model,
        toy.prefs,
        tmp_path / "packed",
        data__packing=True,
        data__share_prompt=share_prompt,
        train__batch_size=len(pairs),
        **common,
    )
    reward.run(padded)
    reward.run(packed)
    first_padded = next(m for m in _metrics(tmp_path / "padded") if "loss" in m)
    first_packed = next(m for m in _metrics(tmp_path / "packed") if "loss" in m)
    assert first_padded["count"] == first_packed["count"] == first_packed["examples"] == len(pairs)
    assert first_padded["loss"] == pytest.approx(first_packed["loss"], rel=1e-5)
    # At initialisation the head is random and small, so the first loss is near log 2.
    assert first_padded["loss"] == pytest.approx(math.log(2), abs=0.05)
    weights_padded = load_file(str(tmp_path / "padded" / "model" / "model.safetensors"))
    weights_packed = load_file(str(tmp_path / "packed" / "model" / "model.safetensors"))
    assert_weights_close(weights_packed, weights_padded, load_file(str(micro_model / "model.safetensors")))


def test_margin_enters_the_loss(tmp_path, micro_model) -> None:
    """Same pairs, margins 0 vs 3: the first step's loss is −logσ(Δ) vs −logσ(Δ − 3) with Δ ≈ 0 (random tiny head),
    i.e. ≈ log 2 = 0.693 vs ≈ log(1 + e³) = 3.049."""
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Repeat: word{i}"}],
            "chosen": [{"role": "assistant", "content": f"word{i}"}],
            "rejected": [{"role": "assistant", "content": f"word{i + 1}"}],
            "margin": 3.0,
        }
        for i in range(16)
    ]
    data = tmp_path / "margins.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = {}
    for use_margin in (False, True):
        out = tmp_path / f"m{use_margin}"
        reward.run(
            reward_config(
                micro_model,
                data,
                out,
                reward__use_margin=use_margin,
                train__max_steps=1,
                train__batch_size=16,
                data__packing=False,
            )
        )
        first[use_margin] = next(m for m in _metrics(out) if "loss" in m)["loss"]
    assert first[False] == pytest.approx(math.log(2), abs=0.05)
    assert first[True] == pytest.approx(math.log1p(math.exp(3.0)), abs=0.1)


def test_lora_reward_model_saves_its_head_and_scores_the_same(toy, micro_model, tmp_path) -> None:
    config = reward_config(
        micro_model,
        toy.prefs,
        tmp_path / "run",
        peft__method="lora",
        peft__r=4,
        train__max_steps=4,
        train__batch_size=8,
        data__eval_fraction=0.2,
        train__eval_every=4,
    )
    summary = reward.run(config)
    model_dir = tmp_path / "run" / "model"
    adapter = load_file(str(model_dir / "adapter_model.safetensors"))
    assert any("score" in name for name in adapter), "the scalar head must be saved with the adapter"
    assert 0.0 <= summary["final_eval_accuracy"] <= 1.0 and "final_eval_reward_gap" in summary
    eval_metrics = [m for m in _metrics(tmp_path / "run") if "eval_accuracy" in m]
    assert eval_metrics and eval_metrics[-1]["eval_accuracy"] == pytest.approx(summary["final_eval_accuracy"])
    # The scorer (base + adapter, merged) gives what the training-time model gave on the same pairs.
    records = read_records(toy.prefs, kind="preference").records[:6]
    scorer = RewardScorer(tmp_path / "run", device="cpu")
    scores = scorer.score([r.prompt + r.chosen for r in records])
    from peft import PeftModel

    from posttrain.config import ModelConfig, PeftConfig
    from posttrain.models import load_model

    trained, tokenizer = load_model(ModelConfig(path=str(micro_model)), PeftConfig(method="full"), scalar_head=True)
    trained.model = PeftModel.from_pretrained(trained.model, model_dir)
    trained.eval()
    reference = []
    with torch.no_grad():
        for r in records:
            from posttrain.data.tokenize import tokenize_conversation

            ids = torch.tensor([tokenize_conversation(scorer.tokenizer, r.prompt + r.chosen, 1 << 20).input_ids])
            reference.append(trained(ids)[0, -1].item())
    assert_close(torch.tensor(scores), torch.tensor(reference), rtol=1e-4, atol=1e-5)


def test_prompt_learning_is_refused_for_reward_models(micro_model, toy, tmp_path) -> None:
    from posttrain.config import ConfigError

    with pytest.raises(ConfigError, match="scalar head"):
        reward_config(micro_model, toy.prefs, tmp_path, peft__method="prompt_tuning", data__packing=False)


def test_score_command(toy, reward_dir, tmp_path) -> None:
    out = tmp_path / "scored.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "posttrain", "score", str(reward_dir), str(toy.prefs), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(read_records(toy.prefs).records)
    accuracy = sum(r["chosen_reward"] > r["rejected_reward"] for r in rows) / len(rows)
    assert f"accuracy {accuracy:.4f}" in done.stdout
    scorer = RewardScorer(reward_dir, device="cpu")
    first = rows[0]
    assert first["chosen_reward"] == pytest.approx(
        scorer.score([first["prompt"] + first["chosen"]])[0], rel=1e-4, abs=1e-5
    )
    bad = subprocess.run(
        [sys.executable, "-m", "posttrain", "score", str(tmp_path / "nothing"), str(toy.prefs)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "not a model directory" in bad.stderr
