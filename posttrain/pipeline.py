"""``posttrain pipeline CONFIG.yaml``: named stages run in dependency order, each reused while unchanged.

A pipeline file names its stages; each is a stage config (a file under ``configs/``, an inline mapping, or both:
the mapping's dotted keys override the file) or the toy kit builder. A value ``${sft.model}`` is the output of
stage ``sft``, which makes ``sft`` an input: the dependency graph comes from these references (plus an explicit
``after:``), so a file lists no order. Outputs of a stage directory ``OUT/NAME``: ``dir`` (the directory),
``model`` (``OUT/NAME/model``); the toy stage's are ``model``, ``sft``, ``prefs``, ``prompts``, ``eval``,
``eval_prefs``, ``eval_mc`` and ``pretrain``.

Reuse. A stage's content hash covers its resolved config and the hashes of its inputs. ``OUT/NAME/stage.json``
records the hash when the stage starts and ``status: done`` when it finishes; a stage whose recorded hash equals
its new one and is done is reused, not rerun. Change a learning rate in ``sft`` and ``sft`` and everything
downstream of it reruns; ``reward`` (not downstream) is reused. ``--from STAGE`` reruns STAGE and everything
downstream of it regardless. (The hash does not cover posttrain's own code: after an upgrade, rerun with
``--from``.)

Failure. A stage that raises leaves every other stage directory as it was; the error names the stage. Its own
directory keeps ``status: running`` and its checkpoints, so the next run (same hash) resumes it from its last
checkpoint instead of starting over.

Evaluation. With an ``eval:`` block, every model-producing stage it lists is evaluated (``eval.evaluate_model``:
exact match, gold reward, length, EOS rate, reward-model score, KL to the reference) as soon as the stage and the
models the evaluation needs are ready; results are cached in ``OUT/NAME/eval.json`` under their own hash. At the
end the pipeline writes ``OUT/eval.json``, ``OUT/report.md`` and ``OUT/report.html``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from posttrain.config import (
    Block,
    ConfigError,
    StageConfig,
    build_config,
    deep_merge,
    parse_overrides,
    read_yaml_mapping,
)
from posttrain.data.records import Prompt
from posttrain.eval import evaluate_model, reward_model_accuracy
from posttrain.eval.common import load_prompts
from posttrain.eval.evaluate import load_reference
from posttrain.eval.report import write_pipeline_report
from posttrain.eval.reward_model import as_scorer
from posttrain.loop import LoopConfig, link_final_policy, run_loop, validate_loop_config
from posttrain.recipes import RECIPES
from posttrain.runtime.checkpoint import write_atomic
from posttrain.toy import DEFAULT_TASKS, build_toy

REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)\}")
TOY_OUTPUTS = ("model", "sft", "prefs", "prompts", "eval", "eval_prefs", "eval_mc", "pretrain")
STATE_FILE = "stage.json"


class PipelineError(RuntimeError):
    """A stage failed or the pipeline cannot run; the message names the stage."""


class ToyBlock(Block):
    """The toy kit (``posttrain.toy.build_toy``): tiny model, tokenizer and synthetic task data."""

    size: str = "tiny"
    tasks: list[str] | None = Field(None, description="task subset (default: all toy tasks)")
    counts: dict[str, int] = Field(
        default_factory=dict, description="rows per file: sft, prefs, prompts, eval, pretrain"
    )


class PipelineStage(Block):
    config: str | dict[str, Any] | None = Field(None, description="a stage config file, or the config inline")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted keys applied over config")
    toy: ToyBlock | None = Field(None, description="instead of a config: build the toy kit")
    loop: dict[str, Any] | None = Field(
        None, description="instead of a config: an iterative RLHF loop (posttrain.loop; its out is the stage's dir)"
    )
    after: list[str] = Field(default_factory=list, description="extra dependencies beyond ${stage.output} references")


class EvalBlock(Block):
    prompts: str = Field(description="held-out verifiable prompts (messages + reference)")
    pairs: str | None = Field(None, description="held-out preference pairs: the reward model's accuracy")
    reward_model: str | None = Field(None, description="scores every model's answers (rm_score)")
    reference: str | None = Field(None, description="KL of every model to this one (kl_to_reference)")
    models: dict[str, str] = Field(description="table row name → stage whose model it evaluates")
    max_new_tokens: int = Field(32, ge=1)
    max_prompts: int | None = Field(None, ge=1)


class PipelineConfig(Block):
    out: str = "runs/pipeline"
    seed: int | None = Field(None, description="given to every stage (and the toy kit) that does not set its own")
    stages: dict[str, PipelineStage]
    eval: EvalBlock | None = None
    quick: dict[str, Any] = Field(default_factory=dict, description="dotted overrides applied by --quick")


@dataclass
class Stage:
    name: str
    spec: PipelineStage
    inputs: list[str] = field(default_factory=list)


def stage_references(value: Any) -> list[tuple[str, str]]:
    if isinstance(value, str):
        return REFERENCE.findall(value)
    if isinstance(value, dict):
        return [ref for item in value.values() for ref in stage_references(item)]
    if isinstance(value, list):
        return [ref for item in value for ref in stage_references(item)]
    return []


def _substitute(value: Any, outputs: dict[str, dict[str, str]]) -> Any:
    if isinstance(value, str):
        return REFERENCE.sub(lambda m: outputs[m.group(1)][m.group(2)], value)
    if isinstance(value, dict):
        return {key: _substitute(item, outputs) for key, item in value.items()}
    if isinstance(value, list):
        return [_substitute(item, outputs) for item in value]
    return value


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Pipeline:
    """A loaded, validated pipeline: stages in dependency order, every config checked before anything runs."""

    def __init__(self, config: PipelineConfig, base_dir: Path, source: str) -> None:
        self.config, self.base_dir, self.source = config, base_dir, source
        self.out = Path(config.out)
        self.stages = {name: Stage(name, spec) for name, spec in config.stages.items()}
        for stage in self.stages.values():
            refs = stage_references(stage.spec.model_dump())
            for ref_stage, output in refs:
                self._check_reference(f"stage {stage.name!r}", ref_stage, output)
            stage.inputs = sorted({ref_stage for ref_stage, _ in refs} | set(stage.spec.after))
            for name in stage.spec.after:
                if name not in self.stages:
                    raise ConfigError(
                        f"{source}: stage {stage.name!r}: after: {name!r} is not a stage ({', '.join(self.stages)})"
                    )
        if config.eval is not None:
            for ref_stage, output in stage_references(config.eval.model_dump()):
                self._check_reference("eval", ref_stage, output)
            for row, stage_name in config.eval.models.items():
                if stage_name not in self.stages:
                    raise ConfigError(
                        f"{source}: eval.models.{row}: {stage_name!r} is not a stage ({', '.join(self.stages)})"
                    )
        self.order = self._topological_order()
        self.resolved = {name: self._resolve(name) for name in self.order}

    def _check_reference(self, where: str, stage: str, output: str) -> None:
        if stage not in self.stages:
            raise ConfigError(
                f"{self.source}: {where}: ${{{stage}.{output}}} names no stage (stages: {', '.join(self.stages)})"
            )
        valid = TOY_OUTPUTS + ("dir",) if self.stages[stage].spec.toy is not None else ("model", "dir")
        if output not in valid:
            raise ConfigError(
                f"{self.source}: {where}: ${{{stage}.{output}}}: stage {stage!r} has outputs {', '.join(valid)}"
            )

    def _topological_order(self) -> list[str]:
        order: list[str] = []
        state: dict[str, str] = {}

        def visit(name: str, path: list[str]) -> None:
            if state.get(name) == "done":
                return
            if state.get(name) == "visiting":
                raise ConfigError(
                    f"{self.source}: stages depend on each other in a cycle: {' -> '.join(path + [name])}"
                )
            state[name] = "visiting"
            for dependency in self.stages[name].inputs:
                visit(dependency, path + [name])
            state[name] = "done"
            order.append(name)

        for name in self.stages:  # file order breaks ties, so independent stages run as written
            visit(name, [])
        return order

    def outputs(self, name: str) -> dict[str, str]:
        directory = self.out / name
        if self.stages[name].spec.toy is not None:
            return {
                "dir": str(directory),
                "model": str(directory / "model"),
                **{k: str(directory / "data" / f"{k}.jsonl") for k in TOY_OUTPUTS[1:]},
            }
        return {"dir": str(directory), "model": str(directory / "model")}

    def reference_row(self) -> str | None:
        """The evaluation row whose model is ``eval.reference`` (its KL column is titled after it), if any."""
        spec = self.config.eval
        if spec is None or not spec.reference:
            return None
        stages = {stage for stage, _ in stage_references(spec.reference)}
        return next((row for row, stage in spec.models.items() if stage in stages), None)

    def _resolve(self, name: str) -> dict[str, Any] | StageConfig | LoopConfig:
        """The stage's final config: a validated StageConfig or LoopConfig, or the toy builder's arguments."""
        spec = self.stages[name].spec
        outputs = {stage: self.outputs(stage) for stage in self.stages}
        if spec.toy is not None:
            toy = spec.toy.model_dump()
            toy["seed"] = self.config.seed if self.config.seed is not None else 0
            return _substitute(toy, outputs)
        if spec.loop is not None:
            overrides = parse_overrides([f"{key}={json.dumps(value)}" for key, value in spec.overrides.items()])
            loop = deep_merge(spec.loop, overrides)
            loop = {**loop, "out": str(self.out / name)}
            if self.config.seed is not None and "seed" not in loop:
                loop["seed"] = self.config.seed
            return validate_loop_config(_substitute(loop, outputs), f"{self.source}, stage {name!r}")
        raw: dict[str, Any] = {}
        if isinstance(spec.config, str):
            path = self.base_dir / spec.config if not Path(spec.config).is_absolute() else Path(spec.config)
            try:
                raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError) as error:
                raise ConfigError(f"{self.source}: stage {name!r}: cannot read config {path}: {error}") from None
        elif isinstance(spec.config, dict):
            raw = spec.config
        overrides = parse_overrides([f"{key}={json.dumps(value)}" for key, value in spec.overrides.items()])
        raw = deep_merge(raw, overrides)
        raw = {**raw, "output_dir": str(self.out / name), "resume": "auto"}
        if self.config.seed is not None and "seed" not in raw:
            raw["seed"] = self.config.seed
        return build_config(_substitute(raw, outputs), source=f"{self.source}, stage {name!r}")

    def stage_hash(self, name: str, hashes: dict[str, str]) -> str:
        resolved = self.resolved[name]
        payload = resolved if isinstance(resolved, dict) else resolved.model_dump(mode="json")
        # Paths inside the pipeline's own out directory are hashed relative to it, so a moved or copied out
        # directory is still reused.
        text = json.dumps(payload, sort_keys=True).replace(json.dumps(str(self.out))[1:-1], "${out}")
        return _hash({"config": text, "inputs": {dep: hashes[dep] for dep in self.stages[name].inputs}})


def load_pipeline(path: str | Path, overrides: list[str] | None = None, quick: bool = False) -> Pipeline:
    """Read and validate a pipeline file. ``overrides``: ``out=DIR``, ``seed=N`` or ``STAGE.key.sub=value``
    (applied to that stage's config, or to the toy block for a toy stage). ``quick``: apply the file's ``quick:``
    overrides first."""
    path = Path(path)
    raw = read_yaml_mapping(path, "pipeline")
    items = [f"{key}={json.dumps(value)}" for key, value in (raw.get("quick") or {}).items()] if quick else []
    for item in items + list(overrides or []):
        key, _, value = item.partition("=")
        if key in ("out", "seed"):
            raw[key] = yaml.safe_load(value)
            continue
        stage, _, rest = key.partition(".")
        if stage not in (raw.get("stages") or {}) or not rest:
            raise ConfigError(
                f"override {item!r}: expected out=, seed= or STAGE.key=value with STAGE one of {', '.join(raw.get('stages') or {})}"
            )
        spec = raw["stages"][stage]
        if "toy" in spec:
            spec["toy"] = deep_merge(spec["toy"] or {}, parse_overrides([f"{rest}={value}"]))
        else:
            spec.setdefault("overrides", {})[rest] = yaml.safe_load(value)
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as error:
        lines = [f"invalid pipeline ({path}):"]
        lines += [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()]
        raise ConfigError("\n".join(lines)) from None
    return Pipeline(config, path.parent, str(path))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, payload: Any) -> None:
    write_atomic(path, json.dumps(payload, indent=1))


def _run_stage(pipeline: Pipeline, name: str) -> dict[str, Any]:
    resolved = pipeline.resolved[name]
    if isinstance(resolved, dict):
        tasks = tuple(resolved["tasks"] or DEFAULT_TASKS)
        build_toy(pipeline.out / name, size=resolved["size"], seed=resolved["seed"], tasks=tasks, **resolved["counts"])
        return {"stage": "toy", "tasks": list(tasks)}
    if isinstance(resolved, LoopConfig):
        report = run_loop(resolved)
        link_final_policy(Path(resolved.out), Path(report["final_policy"]))
        return {"stage": "loop", "rounds": report["rounds"], "final_policy": report["final_policy"]}
    return RECIPES[resolved.stage](resolved, pipeline.source) or {}


@dataclass
class PipelineResult:
    out: Path
    ran: list[str]
    reused: list[str]
    summaries: dict[str, dict[str, Any]]
    evaluation: dict[str, Any] | None
    seconds: dict[str, float]


def run_pipeline(pipeline: Pipeline, from_stage: str | None = None, log: Any = None) -> PipelineResult:
    """Run every stage that is not reusable, in dependency order, evaluating as results become available."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if from_stage is not None and from_stage not in pipeline.stages:
        raise ConfigError(f"--from {from_stage}: not a stage of {pipeline.source} ({', '.join(pipeline.order)})")
    forced = _downstream(pipeline, from_stage) if from_stage else set()
    hashes: dict[str, str] = {}
    ran, reused, summaries, seconds = [], [], {}, {}
    for index, name in enumerate(pipeline.order, 1):
        directory = pipeline.out / name
        hashes[name] = pipeline.stage_hash(name, hashes)
        state = _read_json(directory / STATE_FILE)
        if name not in forced and state and state.get("hash") == hashes[name] and state.get("status") == "done":
            log(f"[{index}/{len(pipeline.order)}] {name}: unchanged, reusing {directory}")
            reused.append(name)
            summaries[name], seconds[name] = state.get("summary", {}), state.get("seconds", 0.0)
            continue
        if directory.exists():
            if state is None:
                raise PipelineError(
                    f"stage {name!r}: {directory} exists but was not written by a pipeline (no {STATE_FILE}); "
                    "move it away or choose another out="
                )
            if state.get("hash") != hashes[name] or name in forced:
                shutil.rmtree(directory)  # stale output of an older config: it must not be resumed from
            else:
                log(f"[{index}/{len(pipeline.order)}] {name}: resuming an interrupted run from its last checkpoint")
        log(f"[{index}/{len(pipeline.order)}] {name}: running -> {directory}")
        started = time.time()
        _write_json(directory / STATE_FILE, {"hash": hashes[name], "status": "running", "started": started})
        try:
            summary = _run_stage(pipeline, name)
        except Exception as error:  # noqa: BLE001 - re-raised with the stage's name; other stages are untouched
            raise PipelineError(f"stage {name!r} failed ({type(error).__name__}): {error}") from error
        seconds[name] = round(time.time() - started, 1)
        summaries[name] = _plain(summary)
        _write_json(
            directory / STATE_FILE,
            {
                "hash": hashes[name],
                "status": "done",
                "started": started,
                "seconds": seconds[name],
                "summary": summaries[name],
            },
        )
        ran.append(name)
        if pipeline.config.eval is not None:
            _evaluate_ready(pipeline, hashes, log)
    evaluation = _evaluate_ready(pipeline, hashes, log) if pipeline.config.eval is not None else None
    result = PipelineResult(pipeline.out, ran, reused, summaries, evaluation, seconds)
    if evaluation is not None:
        write_pipeline_report(pipeline, result)
    return result


def _downstream(pipeline: Pipeline, start: str) -> set[str]:
    found = {start}
    for name in pipeline.order:  # dependency order: a stage's inputs are classified before it
        if any(dep in found for dep in pipeline.stages[name].inputs):
            found.add(name)
    return found


def _plain(value: Any) -> Any:
    """JSON-safe copy of a recipe summary (paths and numpy scalars become strings / floats)."""
    return json.loads(json.dumps(value, default=lambda v: float(v) if hasattr(v, "__float__") else str(v)))


def _evaluate_ready(pipeline: Pipeline, hashes: dict[str, str], log: Any) -> dict[str, Any]:
    """Evaluate each listed stage whose model and evaluation inputs are finished; cached per stage."""
    spec = pipeline.config.eval
    assert spec is not None
    outputs = {stage: pipeline.outputs(stage) for stage in pipeline.stages}
    needs = {ref_stage for ref_stage, _ in stage_references(spec.model_dump(exclude={"models"}))}
    if not needs <= set(hashes):
        return {}
    resolved = _substitute(spec.model_dump(), outputs)
    spec_hash = _hash({"eval": spec.model_dump(), "needs": {n: hashes[n] for n in sorted(needs)}})
    prompts = _read_eval_prompts(resolved["prompts"], spec.max_prompts)
    table: dict[str, Any] = {"models": {}}
    shared: dict[str, Any] = {}  # the reward model and the reference, loaded once and only if a model needs them
    for row, stage in spec.models.items():
        if stage not in hashes:
            continue
        directory = pipeline.out / stage
        cache_key = _hash({"stage": hashes[stage], "eval": spec_hash})
        cached = _read_json(directory / "eval.json")
        if cached and cached.get("hash") == cache_key:
            table["models"][row] = cached["figures"]
            continue
        log(f"  evaluating {row} ({stage}) on {len(prompts)} held-out prompts")
        if not shared:
            shared["reward_model"] = as_scorer(resolved["reward_model"]) if resolved["reward_model"] else None
            shared["reference"] = load_reference(resolved["reference"]) if resolved["reference"] else None
        figures = evaluate_model(
            outputs[stage]["model"],
            prompts,
            reward_model=shared["reward_model"],
            reference=shared["reference"],
            max_new_tokens=spec.max_new_tokens,
        )
        _write_json(directory / "eval.json", {"hash": cache_key, "figures": figures})
        table["models"][row] = figures
    if resolved["pairs"] and resolved["reward_model"]:
        rm_stage = next(ref_stage for ref_stage, _ in stage_references(spec.reward_model or ""))
        cache_file = pipeline.out / rm_stage / "eval_pairs.json"
        cache_key = _hash({"stage": hashes[rm_stage], "eval": spec_hash})
        cached = _read_json(cache_file)
        if cached and cached.get("hash") == cache_key:
            table["reward_model"] = cached["figures"]
        else:
            table["reward_model"] = reward_model_accuracy(resolved["reward_model"], resolved["pairs"])
            _write_json(cache_file, {"hash": cache_key, "figures": table["reward_model"]})
    return table


def _read_eval_prompts(path: str, limit: int | None) -> list[Prompt]:
    return load_prompts(path)[:limit]
