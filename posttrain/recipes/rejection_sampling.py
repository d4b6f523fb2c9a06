"""Rejection sampling (``stage: rejection_sampling``): best-of-n fine-tuning, as in Llama 2 (Touvron et al. 2023,
§3.2.3).

Choices this recipe makes:

- Every prompt of ``data.train`` (prompt records: the turns before a final assistant turn, plus a ``reference``
  when the row has one) gets ``sampling.num_samples`` responses from the policy (``model.path``), sampled with
  the rollout engine's decoding loop and KV cache (``rollout.build_engine``: ours, or vLLM), rendered with
  ``data.template`` or the tokenizer's template (the one the SFT round then trains with), stopping at EOS or the
  template's end of turn.
- Sampling comes first, scoring second, so the policy and a reward model are never in memory together. The
  reward is ``rewards.build_reward(reward)``: a reward model, a function, an HTTP service, or their weighted sum,
  minus ``reward.unfinished_penalty`` for a response cut at ``max_new_tokens``.
- Each prompt keeps its highest-reward response (ties: the earliest sample). Llama 2 keeps the best whatever its
  score; ``rejection.threshold`` drops prompts whose best falls below it instead of training on a bad answer.
  An empty response is never kept (there is nothing to train on), nor, with ``rejection.require_finished`` (the
  default), one cut at ``max_new_tokens``: the SFT round would train it as a complete answer.
- The kept response is the only trained turn of its row: assistant turns inside a multi-turn prompt are marked
  ``weight: 0``, as they were not selected by the reward.
- The SFT round is ``recipes.sft.run`` with an ``SftConfig`` made from this config (the same model, peft, data
  tokenisation, train, optim, schedule, checkpoint and logging blocks; ``data.train`` = the selected rows) in
  the same run directory, so ``metrics.jsonl``, ``checkpoints/``, ``model/`` and ``report.md`` are where every
  stage puts them. The SFT runtime writes its own config there while it trains; when it ends, ``config.yaml`` is
  this stage's config again and the round's is kept as ``sft_config.yaml``.

Run directory, besides the SFT round's files:

- ``samples.jsonl``: every prompt with all its samples (text, reward, finished, tokens), and ``samples.meta.json``
  what they were sampled with. Written atomically once every prompt is scored: with ``resume`` other than false
  a rerun reuses them instead of sampling again, and refuses when model, data, sampling, reward or seed changed.
- ``selected.jsonl``: the SFT dataset, OpenAI messages (prompt + kept response) with its ``reward``.
- ``summary.json``: best-of-n vs mean-of-n reward, kept share, lengths, finished share (and the SFT summary).

Several processes (``--nproc``, torchrun): each samples its share of the prompts with a whole copy of the model
(sampling needs no sharding), every process gets every row, and the fine-tuning round runs under the config's
``distributed`` strategy.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from posttrain.config import RejectionSamplingConfig, SftConfig, StageConfig, save_config
from posttrain.data.dataset import end_of_turn_ids, read_prompts, require_references, use_chat_template
from posttrain.data.records import Prompt
from posttrain.models import load_model, load_tokenizer
from posttrain.recipes import sft
from posttrain.rewards import WeightedReward, build_reward
from posttrain.rollout import SamplingSettings, build_engine, render_prompt_ids
from posttrain.runtime.checkpoint import write_atomic

SAMPLES, SAMPLES_META, SELECTED, SUMMARY = "samples.jsonl", "samples.meta.json", "selected.jsonl", "summary.json"


def select_best(
    rewards: Sequence[Sequence[float]],
    threshold: float | None = None,
    eligible: Sequence[Sequence[bool]] | None = None,
) -> list[int | None]:
    """Per prompt, the index of its highest-reward sample (the earliest on ties) among the ``eligible`` ones, or
    None when no sample is eligible or the best is below ``threshold``."""
    chosen: list[int | None] = []
    for index, scores in enumerate(rewards):
        allowed = eligible[index] if eligible is not None else [True] * len(scores)
        candidates = [i for i, ok in enumerate(allowed) if ok]
        if not candidates:
            chosen.append(None)
            continue
        best = max(candidates, key=lambda i: (scores[i], -i))
        chosen.append(best if threshold is None or scores[best] >= threshold else None)
    return chosen


def summarize(rows: list[dict[str, Any]], chosen: list[int | None]) -> dict[str, Any]:
    """Best-of-n vs mean-of-n reward and what was kept, from the sample rows and the selection."""
    samples = [s for row in rows for s in row["samples"]]
    kept = [row["samples"][i] for row, i in zip(rows, chosen) if i is not None]

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    return {
        "prompts": len(rows),
        "samples_per_prompt": len(rows[0]["samples"]) if rows else 0,
        "mean_of_n_reward": mean([s["reward"] for s in samples]),
        "best_of_n_reward": mean([max(s["reward"] for s in row["samples"]) for row in rows]),
        "kept": len(kept),
        "kept_share": len(kept) / max(len(rows), 1),
        "kept_mean_reward": mean([s["reward"] for s in kept]),
        "mean_tokens": mean([s["num_tokens"] for s in samples]),
        "kept_mean_tokens": mean([s["num_tokens"] for s in kept]),
        "finished_share": mean([float(s["finished"]) for s in samples]),
        "kept_finished_share": mean([float(s["finished"]) for s in kept]),
        "distinct_per_prompt": mean([len({s["text"] for s in row["samples"]}) for row in rows]),
    }


def _where(prompt: Prompt) -> str:
    return f"{prompt.meta.get('source')}:{prompt.meta.get('line')}"


def fingerprint(config: RejectionSamplingConfig, prompts: list[Prompt]) -> dict[str, Any]:
    """What the samples depend on; a rerun may reuse them only when all of it is unchanged."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(json.dumps([prompt.messages, prompt.reference], sort_keys=True).encode())
    return {
        "model": config.model.model_dump(mode="json", include={"path", "tokenizer", "dtype"}),
        "template": config.data.template,
        "prompts": len(prompts),
        "prompts_sha256": digest.hexdigest(),
        "sampling": config.sampling.model_dump(mode="json", exclude={"batch_size"}),
        # How long to wait for a reward service does not change its scores; everything else about the reward does.
        "reward": config.reward.model_dump(mode="json", exclude={"http_timeout", "http_retries"}),
        "seed": config.seed,
    }


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def reusable_samples(
    run_dir: Path, config: RejectionSamplingConfig, expected: dict[str, Any]
) -> list[dict[str, Any]] | None:
    """The samples of an earlier run of this config, or None when there are none or ``resume`` is false."""
    samples, meta = run_dir / SAMPLES, run_dir / SAMPLES_META
    if config.resume is False or not samples.exists():
        return None
    found = json.loads(meta.read_text(encoding="utf-8")) if meta.exists() else {}
    changed = sorted(key for key in expected if found.get(key) != expected[key])
    if changed:
        raise ValueError(
            f"{samples} was sampled with a different {', '.join(changed)} than this config asks for; "
            "use another output_dir, or resume=false to sample again"
        )
    return [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines() if line.strip()]


def sample_and_score(
    config: RejectionSamplingConfig, prompts: list[Prompt], reward: WeightedReward
) -> list[dict[str, Any]]:
    """n samples per prompt from the policy, then their rewards; one row per prompt."""
    return score_samples(sample_prompts(config, prompts), reward)


def sample_prompts(config: RejectionSamplingConfig, prompts: list[Prompt]) -> list[dict[str, Any]]:
    """``sampling.num_samples`` responses to each prompt from the policy (``model.path``), unscored: one row per
    prompt, ``{messages, reference, source, samples: [{text, finished, num_tokens}]}``. The model is freed before
    returning, so a reward model can load next."""
    from transformers import set_seed

    set_seed(config.seed)
    tokenizer = load_tokenizer(config.model)
    template = use_chat_template(tokenizer, config.data.template)
    sampling = config.sampling
    model = None  # vLLM loads the weights itself
    if sampling.engine == "hf":
        # Gradient checkpointing turns the KV cache off; sampling trains nothing, so it is off here.
        model, tokenizer = load_model(
            config.model.model_copy(update={"gradient_checkpointing": False}), None, tokenizer
        )
        model.to("cuda" if torch.cuda.is_available() else "cpu")
    engine = build_engine(
        sampling, config.model, None, model, tokenizer, end_of_turn_ids(tokenizer, template), config.seed
    )
    print(
        f"sampling {sampling.num_samples} responses for each of {len(prompts)} prompts with the {sampling.engine} engine "
        f"(temperature {sampling.temperature}, top_p {sampling.top_p}, top_k {sampling.top_k}, up to "
        f"{sampling.max_new_tokens} tokens; template {template})",
        file=sys.stderr,
    )
    settings = SamplingSettings(
        sampling.num_samples, sampling.max_new_tokens, sampling.temperature, sampling.top_p, sampling.top_k
    )
    groups = engine.generate([render_prompt_ids(tokenizer, p.messages) for p in prompts], settings)
    del model, engine  # before the reward model loads: one model in memory at a time
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return [
        {
            "messages": prompt.messages,
            "reference": prompt.reference,
            "source": _where(prompt),
            "samples": [{"text": r.text, "finished": r.finished, "num_tokens": r.num_tokens} for r in group],
        }
        for prompt, group in zip(prompts, groups)
    ]


def score_samples(rows: list[dict[str, Any]], reward: WeightedReward) -> list[dict[str, Any]]:
    """``rows`` (:func:`sample_prompts`) with each sample's ``reward`` (and its terms under ``rewards`` when the
    reward sums several), then the reward's model released."""
    flat = [(row, sample) for row in rows for sample in row["samples"]]
    scores = reward.breakdown(
        [row["messages"] for row, _ in flat],
        [sample["text"] for _, sample in flat],
        [row["reference"] for row, _ in flat],
        finished=[sample["finished"] for _, sample in flat],
    )
    reward.release()
    terms = [name for name in scores if name != "total"]
    scored, position = [], 0
    for row in rows:
        samples = []
        for sample in row["samples"]:
            sample = {
                "text": sample["text"],
                "reward": scores["total"][position],
                **{k: v for k, v in sample.items() if k != "text"},
            }
            if len(terms) > 1:
                sample["rewards"] = {name: scores[name][position] for name in terms}
            samples.append(sample)
            position += 1
        scored.append({**row, "samples": samples})
    return scored


def selected_rows(rows: list[dict[str, Any]], chosen: list[int | None]) -> list[dict[str, Any]]:
    """The SFT dataset: each kept prompt with its best response as the one trained assistant turn."""
    selected = []
    for row, index in zip(rows, chosen):
        if index is None:
            continue
        prompt = [
            {**{k: v for k, v in m.items() if k != "train"}, **({"weight": 0} if m["role"] == "assistant" else {})}
            for m in row["messages"]
        ]
        best = row["samples"][index]
        selected.append(
            {"messages": [*prompt, {"role": "assistant", "content": best["text"]}], "reward": best["reward"]}
        )
    return selected


def sft_round_config(config: RejectionSamplingConfig, data_path: Path) -> SftConfig:
    """This config's shared blocks as an SFT config that trains on ``data_path``."""
    shared = config.model_dump(mode="json", include=set(StageConfig.model_fields) - {"stage"})
    # format auto, not the prompts' format: the selected rows are OpenAI messages whatever the prompts were.
    shared["data"].update({"train": str(data_path), "format": "auto"})
    return SftConfig.model_validate({**shared, "stage": "sft"})


def format_summary(summary: dict[str, Any]) -> str:
    def show(value: Any) -> str:
        return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    return (
        f"rejection sampling: {summary['prompts']} prompts x {summary['samples_per_prompt']} samples\n"
        f"  reward: best-of-n {show(summary['best_of_n_reward'])}, mean-of-n {show(summary['mean_of_n_reward'])}\n"
        f"  kept {summary['kept']} ({show(summary['kept_share'])}), kept mean reward {show(summary['kept_mean_reward'])}\n"
        f"  tokens per response: {show(summary['mean_tokens'])} (kept {show(summary['kept_mean_tokens'])}); "
        f"ended with end of turn: {show(summary['finished_share'])} (kept {show(summary['kept_finished_share'])})\n"
        f"  distinct responses per prompt: {show(summary['distinct_per_prompt'])}"
    )


def run(config: RejectionSamplingConfig, config_path: str | None = None) -> dict[str, Any]:
    """Sample, score, select, write the SFT dataset and (``rejection.train_after``) fine-tune on it; returns the
    summary."""
    processes = Processes()
    run_dir = Path(config.output_dir)
    if processes.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    # Data and reward before weights: a bad row or an unimportable reward fails in a second, not after sampling.
    prompts = read_prompts(config.data, config.sampling.max_prompts)
    reward = build_reward(config.reward, batch_size=config.sampling.batch_size)
    if reward.needs_reference:
        require_references(prompts, f"reward.function {config.reward.function}")

    expected = fingerprint(config, prompts)
    rows = reusable_samples(run_dir, config, expected)
    if rows is not None:
        print(f"reusing {len(rows)} prompts' samples from {run_dir / SAMPLES}", file=sys.stderr)
    else:
        processes.wait()  # every process has read the old samples' meta before the main one removes them
        if processes.is_main:
            (run_dir / SAMPLES).unlink(missing_ok=True)  # so a crash below cannot pair new meta with old samples
        # Each process samples its share of the prompts (a whole model each: sampling needs no sharding), then
        # every process gets every row, in prompt order, for the selection and the fine-tuning round.
        mine = sample_and_score(config, prompts[processes.rank :: processes.world_size], reward)
        rows = processes.gather_in_order(mine, len(prompts))
        if processes.is_main:
            write_atomic(run_dir / SAMPLES_META, json.dumps(expected, indent=2))
            _write_jsonl(run_dir / SAMPLES, rows)

    eligible = [
        [bool(s["text"].strip()) and (s["finished"] or not config.rejection.require_finished) for s in row["samples"]]
        for row in rows
    ]
    chosen = select_best([[s["reward"] for s in row["samples"]] for row in rows], config.rejection.threshold, eligible)
    selected = selected_rows(rows, chosen)
    summary: dict[str, Any] = {
        "stage": config.stage,
        **summarize(rows, chosen),
        "threshold": config.rejection.threshold,
    }
    if processes.is_main:
        _write_jsonl(run_dir / SELECTED, selected)
        print(format_summary(summary), file=sys.stderr)
        write_atomic(run_dir / SUMMARY, json.dumps(summary, indent=2))
    processes.wait()  # selected.jsonl exists before any process reads it for the fine-tuning round

    if not config.rejection.train_after:
        return summary
    if not selected:
        raise ValueError(
            f"no response was kept (rejection.threshold={config.rejection.threshold}); nothing to fine-tune on"
        )

    sft_config = sft_round_config(config, run_dir / SELECTED)
    try:
        summary["sft"] = sft.run(sft_config, config_path)  # under the run's distributed strategy
    finally:
        if processes.is_main:
            save_config(sft_config, run_dir / "sft_config.yaml")
            save_config(config, run_dir / "config.yaml")
    if processes.is_main:
        write_atomic(run_dir / SUMMARY, json.dumps(summary, indent=2))
    return summary


class Processes:
    """The processes of a launched run (``--nproc``, torchrun) before the fine-tuning round's runtime exists:
    rank, size, a barrier, and gathering the sampled rows. One process: all of it is trivial."""

    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.state: Any = None
        if self.world_size > 1:
            from accelerate import PartialState

            self.state = PartialState(cpu=not torch.cuda.is_available())  # forms the group from torchrun's env
        self.rank = self.state.process_index if self.state is not None else 0
        self.is_main = self.rank == 0

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def gather_in_order(self, mine: list[Any], total: int) -> list[Any]:
        """Every process's rows of ``prompts[rank::world_size]``, back in prompt order, on every process."""
        if self.state is None:
            return mine
        from accelerate.utils import gather_object

        shares = gather_object([mine])  # one list per process, in rank order
        return [shares[index % self.world_size][index // self.world_size] for index in range(total)]
