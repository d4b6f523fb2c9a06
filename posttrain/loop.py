"""``posttrain loop CONFIG``: iterative RLHF in rounds, each ending in a gate before the new policy is promoted.

A round, in ``OUT/round_K/``:

1. ``sample``: ``sampling.num_samples`` responses to each of this round's prompts (``prompts_per_round`` taken in
   turn from the shuffled prompt file) from the current policy (``rejection_sampling.sample_prompts``: the same
   engines as every stage) -> ``samples.jsonl``.
2. ``label``: fresh preference labels on on-policy pairs (two different samples of a prompt) through a ``label``
   database (``posttrain.feedback``): by people (``labels.by: humans``: the loop prints the ``posttrain label
   serve`` command and waits until every item has its votes) or by a function standing in for them
   (``labels.by: function``: an annotator that posts its choices to the label app's HTTP API, as a person's browser
   does). Exported as preference rows, split into ``labels_train.jsonl`` and the held-out ``labels_test.jsonl``.
3. ``reward``: the reward model. Its accuracy on this round's held-out fresh pairs is measured first (Llama 2
   checked its reward model on each new batch); it is retrained on every round's training labels so far
   (``reward_model.retrain``: always, when_inaccurate, never), from ``reward_model.init`` (default: the first
   policy), and measured again on the same fresh pairs, which it never trained on.
4. ``pairs``: the samples scored by the reward model (or ``scoring.function``); per prompt the best against the
   worst, or every pair whose reward gap exceeds ``pairs.tau``. ``selection: best_of_all_rounds`` takes the chosen
   response from every round's samples of the prompt, re-scored now (Llama 2's fix for regressions when it
   selected from the newest model only). ``data: accumulated`` trains on every round's pairs, ``round`` on this
   round's.
5. ``train``: DPO (``stage: dpo`` with ``train.config``) from the current policy, the reference fixed at the first
   policy (``reference: fixed``; ``dpo.reference``) or the current one (``moving``) -> ``policy/``.
6. ``gate``: the candidate against the current policy on held-out prompts (greedy): its win rate by each of
   ``gate.judges`` with the lower end of a ``gate.confidence`` interval above ``gate.min_win_rate``; KL to the
   reference within ``gate.kl_budget``; mean answer length grown at most ``gate.max_length_growth``; the reward
   model's accuracy on fresh pairs at least ``gate.min_rm_accuracy``. A round that fails any check is rolled
   back (the current policy stays) and ``gate.json`` names the failed checks.

Resume. Each stage that ends is recorded in ``round_K/manifest.json`` (seconds, sha256 of what it wrote, the
policy it started from); a rerun skips recorded stages and reruns the interrupted one, whose training resumes
from its last checkpoint, and sampling is seeded per round: a loop killed anywhere ends with the same weights as
one never killed. The config is recorded in ``OUT/loop_config.yaml``; a rerun with another config is refused.

``OUT/loop.json`` holds, per round: gold reward (held-out references), proxy reward (the reward model), win rates
with bounds, KL, length, the reward model's fresh accuracy, the best-minus-median reward gap over samples (what
rejection sampling could still gain), the reward/length correlation, promoted or not and why.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from posttrain.config import (
    Block,
    ConfigError,
    RejectionSamplingConfig,
    RewardSource,
    SamplingBlock,
    build_config,
    deep_merge,
    parse_overrides,
    read_yaml_mapping,
)
from posttrain.data.records import Prompt
from posttrain.eval.common import load_prompts, text_table
from posttrain.eval.evaluate import evaluate_model
from posttrain.eval.reward_model import reward_model_accuracy
from posttrain.eval.win_rate import make_judge
from posttrain.feedback.app import create_app
from posttrain.feedback.store import Item, LabelStore
from posttrain.recipes import RECIPES
from posttrain.recipes.rejection_sampling import sample_prompts, score_samples
from posttrain.rewards import build_reward, load_reward_function
from posttrain.runtime.checkpoint import write_atomic
from posttrain.runtime.distributed import free_loopback_port

STAGES = ("sample", "label", "reward", "pairs", "train", "gate")
MANIFEST, LOOP_JSON, LOOP_CONFIG = "manifest.json", "loop.json", "loop_config.yaml"


class LoopError(RuntimeError):
    """The loop cannot go on: a stage failed, or its directory belongs to another config. Names the round."""


# -- the config ------------------------------------------------------------------------------------------------
class LoopSampling(SamplingBlock):
    """How the policy's responses are sampled each round (the sampling block of every stage), and how many prompts."""

    prompts_per_round: int = Field(256, ge=1)
    """Prompts sampled each round, taken in turn from the shuffled prompt file (wrapping around)."""


class LoopLabels(Block):
    """Fresh preference labels on the policy's own pairs, each round."""

    by: Literal["function", "humans", "none"] = "function"
    """humans: a label database people annotate (``posttrain label serve``), the loop waits; function: a reward
    function stands in for them through the same label API; none: no labels (then the samples are scored by
    ``scoring.function`` or a fixed ``reward_model.path``)."""
    function: str = "toy"
    """For by: function: the annotator, a reward function (built-in name or module:name) of (prompt, response,
    reference); the better-scored response wins, with a degree from the score gap; equal scores are skipped."""
    pairs_per_round: int = Field(128, ge=2)
    """Pairs put up for labelling each round (two different samples of one prompt)."""
    test_fraction: float = Field(0.25, gt=0, lt=1)
    """Share of each round's labelled pairs held out to measure the reward model on fresh on-policy pairs."""
    overlap: int = Field(1, ge=1)
    """Annotators per pair (votes are aggregated by ``label export``)."""
    annotators: list[str] = Field(default_factory=lambda: ["annotator"])
    """For by: humans: the annotators' names (the loop prints one URL each)."""
    poll_s: float = Field(10.0, gt=0)
    """For by: humans: seconds between checks of the label database."""


class LoopRewardModel(Block):
    """The reward model that scores the samples."""

    retrain: Literal["always", "when_inaccurate", "never"] = "always"
    """always: every round, on every round's labels so far; when_inaccurate: when its accuracy on the round's fresh
    pairs is below gate.min_rm_accuracy (or there is none yet); never: ``path`` throughout."""
    path: str | None = None
    """A trained reward model to start from (required with retrain: never, unless scoring.by is function)."""
    init: str | None = None
    """The model a retrained reward model starts from; default: the first policy."""
    warm_start: bool = False
    """Start each retraining from the latest reward model (``path``, then each round's) instead of ``init``."""
    data: list[str] = Field(default_factory=list)
    """Preference files every retraining trains on besides the labels so far (e.g. what the first reward model
    learnt from: Llama 2 kept earlier and open preference data in each new reward model's mix)."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Keys of the reward stage's config (train, optim, schedule, peft, data.max_length, ...)."""


class LoopScoring(Block):
    """What scores the samples to build training pairs."""

    by: Literal["reward_model", "function", "http"] = "reward_model"
    function: str | None = None
    """For by: function: a reward function (built-in name or module:name)."""
    http: str | None = None
    """For by: http: a reward or judge-model service (``posttrain.rewards``' JSON protocol), e.g. an LLM judge."""
    unfinished_penalty: float = Field(0.0, ge=0)
    """Subtracted from a sample that never stopped (reached max_new_tokens)."""


class LoopPairs(Block):
    mode: Literal["best_worst", "threshold"] = "best_worst"
    """best_worst: per prompt its best sample against its worst; threshold: every pair whose gap exceeds tau."""
    tau: float = Field(0.0, ge=0)
    """The reward gap a pair needs (best_worst: between best and worst)."""


class LoopTrain(Block):
    method: Literal["dpo", "ppo"] = "dpo"
    """dpo: DPO on the round's pairs from the current policy (reference per ``reference``); ppo: the PPO stage
    (PPO, GRPO, RLOO... by its algorithm block) on the round's prompts against the round's scorer (its reward
    model, or scoring's function or service), from the current policy."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Keys of that stage's config (dpo or algorithm/sampling, peft, train, optim, schedule, data.max_length, ...)."""


class LoopGate(Block):
    """The checks a round's policy passes before it replaces the current one."""

    prompts: int = Field(128, ge=1)
    """Held-out prompts both policies answer (greedy), from the start of the held-out file."""
    max_new_tokens: int = Field(32, ge=1)
    judges: list[str] = Field(default_factory=lambda: ["reward_model"])
    """Who judges the win rate: reward_model (the round's), gold (the held-out references' checker), or a reward
    function (built-in name or module:name). Each must pass."""
    min_win_rate: float = Field(0.5, ge=0, le=1)
    """The lower end of the win rate's interval must exceed this (ties count one half)."""
    confidence: float = Field(0.95, gt=0, lt=1)
    """Two-sided confidence of the win-rate interval (normal approximation over prompts)."""
    kl_budget: float | None = Field(None, gt=0)
    """Most KL(candidate || reference) allowed, nats summed along the answer, mean over prompts; none: not checked."""
    max_length_growth: float | None = Field(0.5, ge=0)
    """Most relative growth of the mean answer length over the current policy's; none: not checked."""
    min_rm_accuracy: float | None = Field(0.6, ge=0, le=1)
    """Least accuracy of the reward model on the round's fresh held-out pairs; none: not checked."""


class LoopConfig(Block):
    out: str = "runs/loop"
    seed: int = 0
    rounds: int = Field(3, ge=1)
    policy: str = ""
    """The first policy π0: a run, model or adapter directory (usually an SFT run)."""
    prompts: str = ""
    """Training prompts (any prompt format; a reference per row when a function needs one)."""
    heldout: str = ""
    """Held-out prompts for the gate and the report (with references for the gold judge and the gold reward)."""
    reference: Literal["fixed", "moving"] = "fixed"
    """DPO's reference: the first policy every round (fixed), or the round's starting policy (moving)."""
    data: Literal["round", "accumulated"] = "accumulated"
    """DPO trains on this round's pairs, or on every round's so far."""
    selection: Literal["newest", "best_of_all_rounds"] = "newest"
    """Chosen responses from this round's samples, or the best of every round's samples of the prompt."""
    sampling: LoopSampling = Field(default_factory=LoopSampling)
    labels: LoopLabels = Field(default_factory=LoopLabels)
    reward_model: LoopRewardModel = Field(default_factory=LoopRewardModel)
    scoring: LoopScoring = Field(default_factory=LoopScoring)
    pairs: LoopPairs = Field(default_factory=LoopPairs)
    train: LoopTrain = Field(default_factory=LoopTrain)
    gate: LoopGate = Field(default_factory=LoopGate)

    @model_validator(mode="after")
    def _consistent(self) -> LoopConfig:
        for name in ("policy", "prompts", "heldout"):
            if not getattr(self, name):
                raise ValueError(f"{name}: required (a path)")
        if self.uses_reward_model:
            if self.reward_model.retrain == "never" and not self.reward_model.path:
                raise ValueError("reward_model.retrain: never needs reward_model.path")
            if self.reward_model.retrain != "never" and self.labels.by == "none":
                raise ValueError("reward_model.retrain needs labels: set labels.by, or reward_model.retrain: never")
        if self.scoring.by in ("function", "http") and not getattr(self.scoring, self.scoring.by):
            raise ValueError(f"scoring.by: {self.scoring.by} needs scoring.{self.scoring.by}")
        if self.train.method == "ppo" and self.reference == "fixed":
            raise ValueError(
                "train.method: ppo anchors its KL to the policy it starts from; set reference: moving (a fixed PPO "
                "reference is not built)"
            )
        # The inner stage configs fail here, at load, not rounds later.
        reward_stage_config(self, Path("/nonexistent"), Path("/nonexistent"), Path("/nonexistent"))
        train_stage_config(self, Path("/nonexistent"), Path("/nonexistent"), Path("/nonexistent"), "/nonexistent")
        return self

    @property
    def uses_reward_model(self) -> bool:
        return self.scoring.by == "reward_model" or "reward_model" in self.gate.judges


def inner_stage_raw(
    config: LoopConfig, keys: dict[str, Any], stage: str, model: Path | str, out: Path
) -> dict[str, Any]:
    """A stage config the loop runs: quiet defaults, the user's ``keys`` over them, then what the loop decides
    (stage, model, seed, output directory, resumed from its checkpoints when rerun)."""
    raw = deep_merge(
        {"logging": {"tensorboard": False}, "checkpoint": {"keep": 1}, "data": {"eval_fraction": 0.0}}, keys
    )
    return deep_merge(
        raw,
        {"stage": stage, "model": {"path": str(model)}, "seed": config.seed, "output_dir": str(out), "resume": "auto"},
    )


def reward_stage_config(config: LoopConfig, init: Path | str, data: Path, out: Path) -> Any:
    raw = inner_stage_raw(config, config.reward_model.config, "reward", init, out)
    train = [*config.reward_model.data, str(data)] if config.reward_model.data else str(data)
    raw = deep_merge(raw, {"data": {"train": train}})
    return build_config(raw, source="loop reward_model.config")


def train_stage_config(config: LoopConfig, policy: Path | str, data: Path, out: Path, reward_model: str | None) -> Any:
    """The round's training stage config: DPO on ``data`` (the pairs), or PPO on this round's prompts with the
    round's scorer as its reward."""
    raw = inner_stage_raw(config, config.train.config, config.train.method, policy, out)
    if config.train.method == "dpo":
        reference = str(model_dir(config.policy)) if config.reference == "fixed" else None
        raw = deep_merge(raw, {"data": {"train": str(data)}, "dpo": {"reference": reference}})
    else:
        scoring = config.scoring
        source = {"reward_model": "model", "function": "function", "http": "http"}[scoring.by]
        value = reward_model if scoring.by == "reward_model" else getattr(scoring, scoring.by)
        reward: dict[str, Any] = {source: value, "unfinished_penalty": scoring.unfinished_penalty}
        raw = deep_merge(raw, {"data": {"train": str(data)}, "reward": reward})
    return build_config(raw, source="loop train.config")


def load_loop_config(path: str | Path, overrides: list[str] | None = None) -> LoopConfig:
    """Read and validate a loop file; ``overrides`` are ``key.sub=value`` (YAML values)."""
    path = Path(path)
    raw = deep_merge(read_yaml_mapping(path, "loop"), parse_overrides(list(overrides or [])))
    for key in ("policy", "prompts", "heldout"):  # relative paths are relative to the file
        if isinstance(raw.get(key), str) and raw[key] and not Path(raw[key]).is_absolute():
            candidate = path.parent / raw[key]
            raw[key] = str(candidate) if candidate.exists() else raw[key]
    return validate_loop_config(raw, str(path))


def validate_loop_config(raw: dict[str, Any], source: str) -> LoopConfig:
    try:
        return LoopConfig.model_validate(raw)
    except ValidationError as error:
        lines = [f"invalid loop config ({source}):"]
        lines += [f"  {'.'.join(str(p) for p in e['loc']) or 'loop'}: {e['msg']}" for e in error.errors()]
        raise ConfigError("\n".join(lines)) from None
    except ConfigError as error:
        raise ConfigError(f"invalid loop config ({source}): {error}") from None


# -- small mechanics ----------------------------------------------------------------------------------------------
def model_dir(path: str | Path) -> Path:
    """A run directory's ``model/``, else the path itself."""
    path = Path(path)
    return path / "model" if (path / "model").is_dir() else path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_sha256(path: Path) -> str:
    """One hash over a directory's files (names and bytes), or a file's."""
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0" + file_sha256(file).encode())
    return digest.hexdigest()


def weights_sha256(model_path: str | Path) -> str:
    """The hash of a model directory's weight files: what "the same final weights" compares."""
    directory = model_dir(model_path)
    digest = hashlib.sha256()
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin"))
    if not files:
        raise LoopError(f"{directory}: no weight files")
    for file in files:
        digest.update(file.name.encode() + b"\0" + file_sha256(file).encode())
    return digest.hexdigest()


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def round_prompts(prompts: list[Prompt], count: int, round_number: int, seed: int) -> list[Prompt]:
    """Round ``round_number``'s prompts: the next ``count`` of the file's prompts shuffled once by ``seed``."""
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    start = (round_number - 1) * count
    return [prompts[order[(start + i) % len(order)]] for i in range(min(count, len(order)))]


def win_rate_interval(scores_a: Sequence[float], scores_b: Sequence[float], confidence: float) -> dict[str, Any]:
    """A's win rate over B (a tie counts one half) and its two-sided ``confidence`` interval: the mean of the
    per-prompt outcomes (1, 1/2, 0) with the normal approximation of its standard error (a paired comparison)."""
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError(f"{len(scores_a)} scores for A but {len(scores_b)} for B")
    outcomes = [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(scores_a, scores_b)]
    n = len(outcomes)
    mean = sum(outcomes) / n
    spread = math.sqrt(sum((o - mean) ** 2 for o in outcomes) / (n - 1)) if n > 1 else 0.0
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    half = z * spread / math.sqrt(n)
    return {
        "win_rate": mean,
        "lower": max(0.0, mean - half),
        "upper": min(1.0, mean + half),
        "wins": outcomes.count(1.0),
        "ties": outcomes.count(0.5),
        "losses": outcomes.count(0.0),
    }


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    if len(xs) < 2 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return statistics.correlation(xs, ys)


# -- the loop ------------------------------------------------------------------------------------------------------
@dataclass
class RoundState:
    """What a round starts from."""

    number: int
    policy: Path  # the current policy's run or model directory
    reward_model: Path | None  # the latest reward model, if any


class Loop:
    def __init__(self, config: LoopConfig, log: Callable[[str], None] = say) -> None:
        self.config, self.log = config, log
        self.out = Path(config.out)
        self.prompts = load_prompts(config.prompts)
        self.heldout = load_prompts(config.heldout)[: config.gate.prompts]

    # -- running --------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Every round not yet done, then ``loop.json``; returns it."""
        self._claim_out_dir()
        state = RoundState(
            0, Path(self.config.policy), Path(self.config.reward_model.path) if self.config.reward_model.path else None
        )
        for number in range(1, self.config.rounds + 1):
            state = self.run_round(RoundState(number, state.policy, state.reward_model))
        report = self.report(final_policy=state.policy)
        write_atomic(self.out / LOOP_JSON, json.dumps(report, indent=1))
        return report

    def _claim_out_dir(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        recorded = self.out / LOOP_CONFIG
        mine = yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=True)
        if recorded.exists() and recorded.read_text(encoding="utf-8") != mine:
            raise LoopError(
                f"{self.out} holds a loop run with another config ({recorded}); resume it with that config, or "
                "choose another out"
            )
        write_atomic(recorded, mine)

    def run_round(self, state: RoundState) -> RoundState:
        """Run round ``state.number``'s stages that its manifest does not record as done; returns the next state."""
        directory = self.out / f"round_{state.number}"
        directory.mkdir(parents=True, exist_ok=True)
        manifest = read_json(directory / MANIFEST) or {
            "round": state.number,
            "policy_in": str(state.policy),
            "policy_in_sha256": weights_sha256(state.policy),
            "config_sha256": file_sha256(self.out / LOOP_CONFIG),
            "stages": {},
        }
        if manifest["policy_in"] != str(state.policy):
            raise LoopError(
                f"round {state.number}: {directory} started from {manifest['policy_in']}, not {state.policy}"
            )
        context = RoundContext(self, state, directory, manifest)
        for stage in STAGES:
            if stage in manifest["stages"]:
                continue
            self.log(f"[round {state.number}/{self.config.rounds}] {stage}")
            started = time.time()
            try:
                outputs = getattr(context, f"stage_{stage}")()
            except (LoopError, ConfigError):
                raise
            except Exception as error:  # noqa: BLE001 - re-raised naming the round and stage; finished stages stay
                raise LoopError(
                    f"round {state.number}, stage {stage} failed ({type(error).__name__}): {error}"
                ) from error
            manifest["stages"][stage] = {
                "seconds": round(time.time() - started, 1),
                "outputs": {name: tree_sha256(path) for name, path in outputs.items() if path.exists()},
            }
            write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1))
        gate = manifest["gate"]
        policy = directory / "policy" if gate["promoted"] else state.policy
        reward_model = Path(manifest["reward_model"]) if manifest.get("reward_model") else state.reward_model
        return RoundState(state.number + 1, policy, reward_model)

    def report(self, final_policy: Path) -> dict[str, Any]:
        rounds = []
        for number in range(1, self.config.rounds + 1):
            manifest = read_json(self.out / f"round_{number}" / MANIFEST) or {}
            if "gate" not in manifest:
                break
            rounds.append(
                {
                    "round": number,
                    **manifest["metrics"],
                    "promoted": manifest["gate"]["promoted"],
                    "failed_checks": manifest["gate"]["failed"],
                    "seconds": round(sum(s["seconds"] for s in manifest["stages"].values()), 1),
                }
            )
        return {
            "rounds": rounds,
            "final_policy": str(final_policy),
            "final_policy_sha256": weights_sha256(final_policy),
        }


class RoundContext:
    """One round's stages (the module docstring), each returning the files it wrote."""

    def __init__(self, loop: Loop, state: RoundState, directory: Path, manifest: dict[str, Any]) -> None:
        self.loop, self.config, self.state, self.dir, self.manifest = loop, loop.config, state, directory, manifest

    # 1
    def stage_sample(self) -> dict[str, Path]:
        config = self.config
        prompts = round_prompts(self.loop.prompts, config.sampling.prompts_per_round, self.state.number, config.seed)
        sampling = config.sampling.model_dump(exclude={"prompts_per_round"})
        rs = RejectionSamplingConfig.model_validate(
            {
                "model": {"path": str(model_dir(self.state.policy))},
                "data": {"train": config.prompts},
                "sampling": sampling,
                "seed": config.seed * 1000 + self.state.number,  # each round its own draws, the same on a rerun
                "output_dir": str(self.dir / "sample"),
            }
        )
        rows = sample_prompts(rs, prompts)
        write_jsonl(self.dir / "prompts.jsonl", [{"messages": p.messages, "reference": p.reference} for p in prompts])
        write_jsonl(self.dir / "samples.jsonl", rows)
        return {"prompts": self.dir / "prompts.jsonl", "samples": self.dir / "samples.jsonl"}

    # 2
    def stage_label(self) -> dict[str, Path]:
        labels = self.config.labels
        if labels.by == "none":
            return {}
        rows = read_jsonl(self.dir / "samples.jsonl")
        preferences = collect_labels(self.config, rows, self.dir / "labels.db", self.loop.log)
        order = list(range(len(preferences)))
        random.Random(self.config.seed + self.state.number).shuffle(order)
        held = max(1, round(labels.test_fraction * len(order)))
        test = [preferences[i] for i in sorted(order[:held])]
        train = [preferences[i] for i in sorted(order[held:])]
        if not train:
            raise LoopError(f"round {self.state.number}: {len(preferences)} labelled pair(s), too few to train on")
        write_jsonl(self.dir / "labels_train.jsonl", train)
        write_jsonl(self.dir / "labels_test.jsonl", test)
        return {"labels_train": self.dir / "labels_train.jsonl", "labels_test": self.dir / "labels_test.jsonl"}

    # 3
    def stage_reward(self) -> dict[str, Path]:
        config, metrics = self.config, self.manifest.setdefault("metrics", {})
        fresh = self.dir / "labels_test.jsonl"
        previous = self.state.reward_model
        if not config.uses_reward_model:
            return {}
        before = reward_model_accuracy(previous, fresh)["accuracy"] if previous and fresh.exists() else None
        metrics["rm_accuracy_before"] = before
        retrain = config.reward_model.retrain == "always" or (
            config.reward_model.retrain == "when_inaccurate"
            and (before is None or before < (config.gate.min_rm_accuracy or 0.0))
        )
        reward_model = previous
        if retrain:
            data = self.dir / "rm_train.jsonl"
            rows = []
            for number in range(1, self.state.number + 1):
                rows += read_jsonl(self.loop.out / f"round_{number}" / "labels_train.jsonl")
            write_jsonl(data, rows)
            init = config.reward_model.init or model_dir(config.policy)
            if config.reward_model.warm_start and previous is not None:
                init = previous
            stage = reward_stage_config(config, init, data, self.dir / "reward")
            RECIPES["reward"](stage, None)
            reward_model = self.dir / "reward"
        if reward_model is None:
            raise LoopError(f"round {self.state.number}: no reward model (set reward_model.path or labels)")
        self.manifest["reward_model"] = str(reward_model)
        metrics["rm_retrained"] = retrain
        metrics["rm_accuracy"] = reward_model_accuracy(reward_model, fresh)["accuracy"] if fresh.exists() else None
        return {"reward_model": reward_model} if retrain else {}

    # 4
    def stage_pairs(self) -> dict[str, Path]:
        config, metrics = self.config, self.manifest.setdefault("metrics", {})
        rounds = range(1, self.state.number + 1) if config.selection == "best_of_all_rounds" else [self.state.number]
        pools: dict[str, list[dict[str, Any]]] = {}
        current: list[dict[str, Any]] = []
        for number in rounds:
            for row in read_jsonl(self.loop.out / f"round_{number}" / "samples.jsonl"):
                key = json.dumps(row["messages"], sort_keys=True)
                pools.setdefault(key, [])
                if number == self.state.number:
                    current.append(row)
                pools[key] += [{**s, "round": number} for s in row["samples"]]
        scorer = self.scorer()
        scored = score_samples(
            [{**row, "samples": pools[json.dumps(row["messages"], sort_keys=True)]} for row in current], scorer
        )
        pairs = []
        for row in scored:
            newest = [s for s in row["samples"] if s["round"] == self.state.number and s["text"].strip()]
            pool = [s for s in row["samples"] if s["text"].strip()]
            pairs += build_pairs(row, newest, pool, config.pairs.mode, config.pairs.tau)
        write_jsonl(self.dir / "pairs.jsonl", pairs)
        newest_rewards = [[s["reward"] for s in row["samples"] if s["round"] == self.state.number] for row in scored]
        lengths = [s["num_tokens"] for row in scored for s in row["samples"] if s["round"] == self.state.number]
        metrics["proxy_reward_samples"] = statistics.fmean(r for group in newest_rewards for r in group)
        metrics["max_minus_median_reward"] = statistics.fmean(
            max(group) - statistics.median(group) for group in newest_rewards
        )
        metrics["reward_length_correlation"] = pearson([r for g in newest_rewards for r in g], lengths)
        metrics["pairs"] = len(pairs)
        data = []
        for number in range(1, self.state.number + 1) if config.data == "accumulated" else [self.state.number]:
            path = (
                self.dir / "pairs.jsonl"
                if number == self.state.number
                else self.loop.out / f"round_{number}" / "pairs.jsonl"
            )
            data += read_jsonl(path)
        if not data and config.train.method == "dpo":
            raise LoopError(
                f"round {self.state.number}: no training pair (every prompt's samples scored within pairs.tau="
                f"{config.pairs.tau}); sample more, or at a higher temperature"
            )
        write_jsonl(self.dir / "dpo_train.jsonl", data)
        return {"pairs": self.dir / "pairs.jsonl", "dpo_train": self.dir / "dpo_train.jsonl"}

    def scorer(self) -> Any:
        scoring = self.config.scoring
        if scoring.by == "function":
            source = RewardSource(function=scoring.function, unfinished_penalty=scoring.unfinished_penalty)
        else:
            source = RewardSource(model=self.manifest["reward_model"], unfinished_penalty=scoring.unfinished_penalty)
        return build_reward(source, batch_size=self.config.sampling.batch_size)

    # 5
    def stage_train(self) -> dict[str, Path]:
        config = self.config
        # PPO samples its own rollouts: from this round's prompts (written by the sample stage).
        data = self.dir / ("dpo_train.jsonl" if config.train.method == "dpo" else "prompts.jsonl")
        stage = train_stage_config(
            config, model_dir(self.state.policy), data, self.dir / "policy", self.manifest.get("reward_model")
        )
        RECIPES[config.train.method](stage, None)
        return {"policy": self.dir / "policy" / "model"}

    # 6
    def stage_gate(self) -> dict[str, Path]:
        config, gate, metrics = self.config, self.config.gate, self.manifest.setdefault("metrics", {})
        reference = model_dir(config.policy)
        candidate, current = self.dir / "policy", self.state.policy
        evaluations = {}
        for name, path in (("candidate", candidate), ("current", current)):
            evaluations[name] = evaluate_model(
                path,
                self.loop.heldout,
                reference=str(reference) if name == "candidate" else None,  # only the candidate's KL is checked
                max_new_tokens=gate.max_new_tokens,
                reward_model=self.manifest.get("reward_model"),
            )
        new, old = evaluations["candidate"], evaluations["current"]
        checks: dict[str, dict[str, Any]] = {}
        win_rates = {}
        for judge_name in gate.judges:
            judge = self.judge(judge_name)
            scores_new, scores_old = judge(self.loop.heldout, new["answers"]), judge(self.loop.heldout, old["answers"])
            interval = win_rate_interval(scores_new, scores_old, gate.confidence)
            win_rates[judge_name] = interval
            checks[f"win_rate[{judge_name}]"] = {
                "value": interval["lower"],
                "limit": gate.min_win_rate,
                "passed": interval["lower"] > gate.min_win_rate,
                "detail": interval,
            }
        if gate.kl_budget is not None:
            kl = new["kl_to_reference"]
            checks["kl_to_reference"] = {"value": kl, "limit": gate.kl_budget, "passed": kl <= gate.kl_budget}
        if gate.max_length_growth is not None:
            growth = new["length"] / max(old["length"], 1e-9) - 1.0
            checks["length_growth"] = {
                "value": growth,
                "limit": gate.max_length_growth,
                "passed": growth <= gate.max_length_growth,
            }
        accuracy = metrics.get("rm_accuracy")
        if gate.min_rm_accuracy is not None and accuracy is not None:
            checks["rm_accuracy"] = {
                "value": accuracy,
                "limit": gate.min_rm_accuracy,
                "passed": accuracy >= gate.min_rm_accuracy,
            }
        failed = [name for name, check in checks.items() if not check["passed"]]
        promoted = not failed
        metrics.update(
            gold_reward=new.get("gold_reward"),
            gold_reward_current=old.get("gold_reward"),
            proxy_reward=new.get("rm_score"),
            proxy_reward_current=old.get("rm_score"),
            win_rate={
                name: {k: interval[k] for k in ("win_rate", "lower", "upper")} for name, interval in win_rates.items()
            },
            kl_to_reference=new.get("kl_to_reference"),
            length=new["length"],
            length_current=old["length"],
            exact_match=new.get("exact_match"),
        )
        self.manifest["gate"] = {"promoted": promoted, "failed": failed, "checks": checks}
        write_atomic(self.dir / "gate.json", json.dumps(self.manifest["gate"], indent=1))
        verdict = "promoted" if promoted else f"rolled back (failed: {', '.join(failed)})"
        self.loop.log(f"[round {self.state.number}] gate: {verdict}")
        return {"gate": self.dir / "gate.json"}

    def judge(self, name: str) -> Callable[[Sequence[Prompt], Sequence[str]], list[float]]:
        if name == "reward_model":
            return make_judge(self.manifest["reward_model"])
        if name == "gold":
            return make_judge("gold")
        function = load_reward_function(name)

        def by_function(rows: Sequence[Prompt], answers: Sequence[str]) -> list[float]:
            return function([r.messages for r in rows], list(answers), [r.reference for r in rows])

        return by_function


# -- labels ------------------------------------------------------------------------------------------------------
def label_items(rows: list[dict[str, Any]], count: int) -> tuple[list[Item], list[str | None]]:
    """Up to ``count`` comparisons: per prompt (in order) its first two different non-empty samples; with each
    item, the prompt's reference (for a function annotator)."""
    items, references = [], []
    for row in rows:
        texts = list(dict.fromkeys(s["text"] for s in row["samples"] if s["text"].strip()))
        if len(texts) < 2:
            continue
        items.append(Item(prompt=row["messages"], response_a=texts[0], response_b=texts[1]))
        references.append(row.get("reference"))
        if len(items) == count:
            break
    return items, references


def degree_of(gap: float) -> int:
    """A score gap as Llama 2's degree of preference: 1 much better (gap >= 1), 2 better (>= 0.5), 3 slightly
    better (>= 0.2), 4 negligibly better."""
    return 1 if gap >= 1 else 2 if gap >= 0.5 else 3 if gap >= 0.2 else 4


def collect_labels(
    config: LoopConfig, rows: list[dict[str, Any]], db: Path, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """This round's preference rows from the label database ``db`` (created with the round's comparisons on the
    first call; a rerun continues it): annotated by ``labels.function`` (one annotator, ``function``) or by
    people, whom the loop waits for."""
    labels = config.labels
    store = LabelStore(db)
    try:
        if not store.items():
            items, references = label_items(rows, labels.pairs_per_round)
            if len(items) < 2:
                raise LoopError(
                    f"{db}: only {len(items)} prompt(s) have two different samples; sample more, or at a higher temperature"
                )
            store.configure(overlap=labels.overlap if labels.by == "humans" else 1, gold_rate=0.0, seed=config.seed)
            ids = store.add_items(items)
            write_atomic(db.with_suffix(".references.json"), json.dumps(dict(zip(ids, references))))
        if labels.by == "function":
            annotate_with_function(store, labels.function, json.loads(db.with_suffix(".references.json").read_text()))
        else:
            wait_for_people(store, db, labels, log)
        preferences = store.preferences()
    finally:
        store.close()
    return preferences


def annotate_with_function(store: LabelStore, function_spec: str, references: dict[str, str | None]) -> None:
    """One annotator, ``function``, labels every card it is served, through the label app's HTTP API (the app of
    ``posttrain label serve``, on a free loopback port for the length of the call), as a person's browser would:
    the response the function scores higher wins, with the degree of :func:`degree_of` their gap; equal scores
    are skipped as "responses identical" in worth."""
    import httpx

    function = load_reward_function(function_spec)
    token = store.add_annotators(["function"])["function"]
    with label_app(store) as url, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as client:
        while (card := _checked(client.get("/api/next"))["card"]) is not None:
            reference = references.get(card["item_id"])
            prompt = card["prompt"]
            left, right = function([prompt, prompt], [card["left"], card["right"]], [reference, reference])
            answer: dict[str, Any] = {"item_id": card["item_id"]}
            if left == right:
                answer["skip_reason"] = "responses identical"
            else:
                degree = degree_of(abs(left - right))
                answer["value"] = degree if left > right else 9 - degree
            _checked(client.post("/api/label", json=answer))


def _checked(response: Any) -> Any:
    if response.status_code != 200:
        raise LoopError(f"label app: {response.request.method} {response.request.url.path}: {response.text[:300]}")
    return response.json()


@contextmanager
def label_app(store: LabelStore) -> Iterator[str]:
    """The label app over ``store`` on a free loopback port in a background thread; yields its URL."""
    import uvicorn

    port = free_loopback_port()
    server = uvicorn.Server(uvicorn.Config(create_app(store), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="label-app", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise LoopError(f"the label app did not start on 127.0.0.1:{port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_for_people(store: LabelStore, db: Path, labels: LoopLabels, log: Callable[[str], None]) -> None:
    """Print how to serve ``db`` to the annotators, then wait until every comparison has its votes."""
    names = " ".join(labels.annotators)
    log(
        f"waiting for labels: serve them with\n  posttrain label serve {db} --annotators {names} "
        f"--overlap {labels.overlap}\n(the loop goes on when every comparison has its votes; Ctrl-C and rerun "
        "resumes here)"
    )
    while not store.is_complete():
        progress = store.progress()
        log(f"labels: {progress}")
        time.sleep(labels.poll_s)


def build_pairs(
    row: dict[str, Any], newest: list[dict[str, Any]], pool: list[dict[str, Any]], mode: str, tau: float
) -> list[dict[str, Any]]:
    """The training pairs of one prompt: ``best_worst``, the best of ``pool`` against the worst of ``newest``
    when their reward gap exceeds ``tau`` (ties: the earliest sample); ``threshold``, every pair of ``pool``
    samples (newest on one side at least) whose gap exceeds ``tau``."""
    if not newest:
        return []

    def pair(chosen: dict[str, Any], rejected: dict[str, Any]) -> dict[str, Any]:
        return {
            "prompt": row["messages"],
            "chosen": chosen["text"],
            "rejected": rejected["text"],
            "reward_chosen": chosen["reward"],
            "reward_rejected": rejected["reward"],
        }

    if mode == "best_worst":
        best = max(pool, key=lambda s: s["reward"])
        worst = min(newest, key=lambda s: s["reward"])
        return [pair(best, worst)] if best["reward"] - worst["reward"] > tau and best["text"] != worst["text"] else []
    out, seen = [], set()
    for a in pool:
        for b in newest:
            if a["reward"] - b["reward"] > tau and a["text"] != b["text"] and (a["text"], b["text"]) not in seen:
                seen.add((a["text"], b["text"]))
                out.append(pair(a, b))
    return out


def format_rounds(report: dict[str, Any]) -> str:
    """The per-round table the loop prints at the end."""

    def number(value: Any, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    header = ["round", "gold", "proxy", "win rate (lower)", "KL", "length", "RM acc", "max-med", "promoted"]
    rows = []
    for r in report["rounds"]:
        rates = " ".join(f"{k}:{v['win_rate']:.2f}({v['lower']:.2f})" for k, v in (r.get("win_rate") or {}).items())
        rows.append(
            [
                str(r["round"]),
                number(r.get("gold_reward")),
                number(r.get("proxy_reward")),
                rates or "-",
                number(r.get("kl_to_reference"), 2),
                number(r.get("length"), 1),
                number(r.get("rm_accuracy"), 2),
                number(r.get("max_minus_median_reward"), 2),
                "yes" if r["promoted"] else "no: " + ", ".join(r["failed_checks"]),
            ]
        )
    return text_table(header, rows, rule=True) + f"\nfinal policy: {report['final_policy']}"


def run_loop(config: LoopConfig, log: Callable[[str], None] = say) -> dict[str, Any]:
    return Loop(config, log).run()


def link_final_policy(out: Path, final: Path) -> None:
    """``OUT/model``: a link to the final policy's model directory (relative when it lies inside ``OUT``), the
    model a pipeline's ``${stage.model}`` names."""
    link, target = out / "model", model_dir(final).resolve()
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        raise LoopError(f"{link} exists and is not a link; move it away")
    inside = target.is_relative_to(out.resolve())
    link.symlink_to(os.path.relpath(target, out.resolve()) if inside else target, target_is_directory=True)
