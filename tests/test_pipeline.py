"""Pipelines: dependency order from ${stage.output} references, reuse by content hash, --from, failures that name
their stage and leave the other stages' outputs intact, and the configs' early validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from posttrain.config import ConfigError
from posttrain.loop import LoopConfig
from posttrain.pipeline import PipelineError, load_pipeline, run_pipeline

COMMON = {
    "checkpoint": {"every": 1000, "keep": 1},
    "logging": {"tensorboard": False, "progress": False, "report": False},
}


def write_pipeline(tmp_path: Path, **changes: Any) -> Path:
    """toy → sft → {reward, dpo}; reward and dpo are independent of each other."""
    raw: dict[str, Any] = {
        "out": str(tmp_path / "out"),
        "seed": 3,
        "stages": {
            "toy": {
                "toy": {
                    "size": "mini",
                    "tasks": ["count", "upper"],
                    "counts": {"sft": 64, "prefs": 32, "prompts": 16, "eval": 8, "pretrain": 16},
                }
            },
            "sft": {
                "config": {
                    "stage": "sft",
                    "model": {"path": "${toy.model}"},
                    "data": {"train": "${toy.sft}", "max_length": 64},
                    "train": {"max_steps": 2, "batch_size": 4},
                    "optim": {"lr": 1e-3},
                    **COMMON,
                }
            },
            "reward": {
                "config": {
                    "stage": "reward",
                    "model": {"path": "${sft.model}"},
                    "data": {"train": "${toy.prefs}", "max_length": 64},
                    "train": {"max_steps": 2, "batch_size": 4},
                    **COMMON,
                }
            },
            "dpo": {
                "config": {
                    "stage": "dpo",
                    "model": {"path": "${sft.model}"},
                    "peft": {"method": "full"},
                    "data": {"train": "${toy.prefs}", "max_length": 64},
                    "train": {"max_steps": 2, "batch_size": 4},
                    **COMMON,
                }
            },
        },
    }
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def weights_mtime(out: Path, stage: str) -> float:
    return (out / stage / "model" / "model.safetensors").stat().st_mtime_ns


def test_runs_in_dependency_order_then_reuses_everything(tmp_path: Path) -> None:
    path = write_pipeline(tmp_path)
    pipeline = load_pipeline(path)
    assert pipeline.order == ["toy", "sft", "reward", "dpo"]
    assert pipeline.stages["reward"].inputs == ["sft", "toy"]
    first = run_pipeline(load_pipeline(path), log=lambda m: None)
    assert first.ran == ["toy", "sft", "reward", "dpo"] and first.reused == []
    out = tmp_path / "out"
    for stage in first.ran:
        assert json.loads((out / stage / "stage.json").read_text())["status"] == "done"
    # The stage read its input from the stage it references.
    assert yaml.safe_load((out / "reward" / "config.yaml").read_text())["model"]["path"] == str(out / "sft" / "model")
    before = {stage: weights_mtime(out, stage) for stage in ("sft", "reward", "dpo")}

    second = run_pipeline(load_pipeline(path), log=lambda m: None)
    assert second.ran == [] and second.reused == ["toy", "sft", "reward", "dpo"]
    assert {stage: weights_mtime(out, stage) for stage in before} == before


def test_a_changed_stage_reruns_with_its_downstream_only(tmp_path: Path) -> None:
    path = write_pipeline(tmp_path)
    run_pipeline(load_pipeline(path), log=lambda m: None)
    changed = run_pipeline(load_pipeline(path, ["reward.optim.lr=0.0003"]), log=lambda m: None)
    assert changed.ran == ["reward"] and changed.reused == ["toy", "sft", "dpo"]
    upstream = run_pipeline(load_pipeline(path, ["reward.optim.lr=0.0003", "sft.optim.lr=0.002"]), log=lambda m: None)
    assert upstream.ran == ["sft", "reward", "dpo"] and upstream.reused == ["toy"]
    assert yaml.safe_load((tmp_path / "out" / "sft" / "config.yaml").read_text())["optim"]["lr"] == 0.002


def test_from_reruns_the_stage_and_its_downstream(tmp_path: Path) -> None:
    path = write_pipeline(tmp_path)
    run_pipeline(load_pipeline(path), log=lambda m: None)
    again = run_pipeline(load_pipeline(path), from_stage="sft", log=lambda m: None)
    assert again.ran == ["sft", "reward", "dpo"] and again.reused == ["toy"]
    leaf = run_pipeline(load_pipeline(path), from_stage="dpo", log=lambda m: None)
    assert leaf.ran == ["dpo"]
    with pytest.raises(ConfigError, match="--from nope: not a stage"):
        run_pipeline(load_pipeline(path), from_stage="nope")


def test_a_failing_stage_is_named_and_leaves_the_others_intact(tmp_path: Path) -> None:
    path = write_pipeline(tmp_path, stages__dpo__overrides={"data.train": str(tmp_path / "missing.jsonl")})
    log: list[str] = []
    with pytest.raises(PipelineError, match="stage 'dpo' failed") as failure:
        run_pipeline(load_pipeline(path), log=log.append)
    assert "missing.jsonl" in str(failure.value)
    out = tmp_path / "out"
    for stage in ("toy", "sft", "reward"):
        assert json.loads((out / stage / "stage.json").read_text())["status"] == "done"
    assert (out / "sft" / "model" / "model.safetensors").exists()
    assert json.loads((out / "dpo" / "stage.json").read_text())["status"] == "running"

    fixed = write_pipeline(tmp_path)
    rerun = run_pipeline(load_pipeline(fixed), log=lambda m: None)
    assert rerun.ran == ["dpo"] and rerun.reused == ["toy", "sft", "reward"]


def test_an_interrupted_stage_with_the_same_config_is_resumed_not_wiped(tmp_path: Path) -> None:
    path = write_pipeline(tmp_path)
    run_pipeline(load_pipeline(path), log=lambda m: None)
    out = tmp_path / "out"
    state = json.loads((out / "dpo" / "stage.json").read_text())
    (out / "dpo" / "stage.json").write_text(json.dumps({**state, "status": "running"}))
    (out / "dpo" / "kept.txt").write_text("from the interrupted run")
    log: list[str] = []
    rerun = run_pipeline(load_pipeline(path), log=log.append)
    assert rerun.ran == ["dpo"]
    assert (out / "dpo" / "kept.txt").exists()  # same hash: the directory (and its checkpoints) were kept
    assert any("resuming" in line for line in log)

    # A different config: the stale directory is replaced, so nothing resumes from the old run.
    run_pipeline(load_pipeline(path, ["dpo.optim.lr=0.0001"]), log=lambda m: None)
    assert not (out / "dpo" / "kept.txt").exists()


def test_an_unrelated_directory_is_never_deleted(tmp_path: Path) -> None:
    path = write_pipeline(tmp_path)
    (tmp_path / "out" / "toy").mkdir(parents=True)
    (tmp_path / "out" / "toy" / "precious.txt").write_text("mine")
    with pytest.raises(PipelineError, match="was not written by a pipeline"):
        run_pipeline(load_pipeline(path), log=lambda m: None)
    assert (tmp_path / "out" / "toy" / "precious.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stages__reward__config__model__path": "${rm.model}"}, r"stage 'reward': \$\{rm.model\} names no stage"),
        ({"stages__reward__config__model__path": "${sft.weights}"}, r"stage 'sft' has outputs model, dir"),
        ({"stages__sft__config__model__path": "${dpo.model}"}, "cycle: sft -> dpo -> sft"),
        (
            {"stages__sft__config__optim__learning_rate": 0.1},
            r"stage 'sft'.*unknown key optim.learning_rate; did you mean optim.lr",
        ),
        ({"stages__dpo__after": ["nope"]}, "after: 'nope' is not a stage"),
        ({"stages__toy__toy__colour": "red"}, r"invalid pipeline.*stages.toy.toy.colour"),
    ],
)
def test_bad_pipelines_are_refused_before_anything_runs(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    path = write_pipeline(tmp_path, **change)
    with pytest.raises(ConfigError, match=f"(?s){message}"):
        load_pipeline(path)
    assert not (tmp_path / "out").exists()


def test_overrides_name_the_stages(tmp_path: Path) -> None:
    path = write_pipeline(tmp_path)
    with pytest.raises(ConfigError, match="expected out=, seed= or STAGE.key=value"):
        load_pipeline(path, ["rm.optim.lr=1"])
    pipeline = load_pipeline(path, ["seed=11", "toy.counts.sft=70"])
    assert pipeline.resolved["sft"].seed == 11 and pipeline.resolved["toy"]["counts"]["sft"] == 70


PIPELINE_CONFIGS = sorted(
    p
    for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")
    if "stages" in yaml.safe_load(p.read_text())
)


@pytest.mark.parametrize("config", PIPELINE_CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_every_shipped_pipeline_validates(config: Path, quick: bool) -> None:
    pipeline = load_pipeline(config, quick=quick)
    assert pipeline.order[0] == "toy" and len(pipeline.order) == len(pipeline.stages)
    for name in pipeline.order[1:]:
        resolved = pipeline.resolved[name]
        written_to = resolved.out if isinstance(resolved, LoopConfig) else resolved.output_dir
        assert written_to == str(pipeline.out / name)


def test_a_copied_out_directory_is_reused(tmp_path: Path) -> None:
    import shutil

    path = write_pipeline(tmp_path)
    run_pipeline(load_pipeline(path), log=lambda m: None)
    shutil.copytree(tmp_path / "out", tmp_path / "copy")
    copied = run_pipeline(load_pipeline(path, [f"out={tmp_path / 'copy'}"]), log=lambda m: None)
    assert copied.ran == [] and len(copied.reused) == 4
