"""Typed configs: unknown keys fail naming the key and the closest valid one; every shipped YAML validates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from posttrain.cli import SHIPPED_CONFIGS, main
from posttrain.config import STAGE_CONFIGS, ConfigError, SftConfig, describe_fields, load_config, parse_overrides

REQUIRED = ["model.path=/some/model", "data.train=/some/data.jsonl"]


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_unknown_nested_key_names_it_and_the_closest_valid_one(tmp_path) -> None:
    path = _write(tmp_path, {"stage": "sft", "optim": {"learning_rate": 1e-4}})
    with pytest.raises(ConfigError) as error:
        load_config(path, REQUIRED)
    message = str(error.value)
    assert "unknown key optim.learning_rate" in message
    assert "did you mean optim.lr?" in message
    assert str(path) in message


def test_unknown_top_level_key_and_override_typo(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key output_dri; did you mean output_dir\?"):
        load_config(None, ["stage=sft", *REQUIRED, "output_dri=/tmp/x"])
    with pytest.raises(ConfigError, match=r"train.max_step; did you mean train.max_steps\?"):
        load_config(None, ["stage=sft", *REQUIRED, "train.max_step=3"])


def test_wrong_types_and_values_are_explained() -> None:
    with pytest.raises(ConfigError, match=r"train.batch_size: .*greater than or equal to 1"):
        load_config(None, ["stage=sft", *REQUIRED, "train.batch_size=0"])
    with pytest.raises(ConfigError, match=r"peft.method"):
        load_config(None, ["stage=sft", *REQUIRED, "peft.method=lora2"])
    with pytest.raises(ConfigError, match=r"stage 'stf' .* did you mean sft\?"):
        load_config(None, ["stage=stf", *REQUIRED])
    with pytest.raises(ConfigError, match="model.path is required"):
        load_config(None, ["stage=sft", "data.train=x.jsonl"])


def test_cross_checks() -> None:
    with pytest.raises(ConfigError, match="set data.packing=false"):
        load_config(None, ["stage=sft", *REQUIRED, "peft.method=prompt_tuning"])
    with pytest.raises(ConfigError, match="freeze trains nothing"):
        load_config(None, ["stage=sft", *REQUIRED, "peft.method=freeze"])
    with pytest.raises(ConfigError, match="resume must be auto, false or a checkpoint path"):
        load_config(None, ["stage=sft", *REQUIRED, "resume=true"])


PPO = ["stage=ppo", *REQUIRED]


def test_kl_in_the_loss_never_uses_k1() -> None:
    """k1 = log π − log π_ref as a loss term has zero expected gradient: refused when written, and an unset
    estimator follows the mode (k3 in the loss, k1 in the reward), so `kl_mode=loss` alone anchors the policy."""
    with pytest.raises(ConfigError, match=r"kl_mode=loss with kl_estimator=k1 .* expected gradient is zero"):
        load_config(None, [*PPO, "algorithm.kl_mode=loss", "algorithm.kl_estimator=k1"])
    assert load_config(None, [*PPO, "algorithm.kl_mode=loss"]).algorithm.kl_estimator == "k3"
    assert load_config(None, PPO).algorithm.kl_estimator == "k1"
    assert (
        load_config(None, [*PPO, "algorithm.kl_mode=loss", "algorithm.kl_estimator=k2"]).algorithm.kl_estimator == "k2"
    )
    assert (
        load_config(None, [*PPO, "algorithm.kl_mode=reward", "algorithm.kl_estimator=k3"]).algorithm.kl_estimator
        == "k3"
    )


def test_kl_target_needs_a_nonzero_starting_coefficient() -> None:
    """The adaptive controller multiplies kl_coef, so from 0 it would stay 0 (N1)."""
    with pytest.raises(ConfigError, match=r"kl_target steers kl_coef multiplicatively"):
        load_config(None, [*PPO, "algorithm.kl_coef=0", "algorithm.kl_target=3.0"])
    assert load_config(None, [*PPO, "algorithm.kl_coef=0"]).algorithm.kl_coef == 0


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix"])
@pytest.mark.parametrize("shared", [False, True])
def test_a_critic_with_prompt_learning_is_refused(method: str, shared: bool) -> None:
    """A separate critic's scalar head never sees the virtual tokens (only its head would train, a linear probe);
    a shared one reads hidden states prompt learning does not expose. Critic-free estimators still accept it."""
    with pytest.raises(ConfigError, match=rf"peft.method={method} cannot train a critic"):
        load_config(
            None, [*PPO, f"peft.method={method}", "data.packing=false", f"critic.shared={str(shared).lower()}"]
        )
    grpo = load_config(
        None,
        [*PPO, f"peft.method={method}", "data.packing=false", "algorithm.advantage=grpo", "sampling.num_samples=2"],
    )
    assert grpo.peft.method == method


def test_overrides_are_parsed_as_yaml_values() -> None:
    assert parse_overrides(["a.b=3", "a.c=[x, y]", "d=false", "e=/p/q"]) == {
        "a": {"b": 3, "c": ["x", "y"]},
        "d": False,
        "e": "/p/q",
    }
    config = load_config(
        None, ["stage=sft", *REQUIRED, "train.max_steps=20", "peft.target_modules=[q_proj,v_proj]", "resume=false"]
    )
    assert isinstance(config, SftConfig)
    assert (
        config.train.max_steps == 20 and config.peft.target_modules == ["q_proj", "v_proj"] and config.resume is False
    )
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides(["train.max_steps"])


# Stage configs; pipeline files (a `stages:` mapping) are validated in test_pipeline.py.
STAGE_FILES = sorted(p for p in SHIPPED_CONFIGS.rglob("*.yaml") if "stages" not in yaml.safe_load(p.read_text()))


@pytest.mark.parametrize("path", STAGE_FILES, ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    overrides = [o for o in REQUIRED if not (raw.get(o.split(".")[0], {}) or {}).get(o.split(".")[1].split("=")[0])]
    config = load_config(path, overrides)
    assert config.stage == raw["stage"]


def test_shipped_configs_cover_every_sft_method() -> None:
    methods = set()
    for path in STAGE_FILES:
        raw = yaml.safe_load(path.read_text())
        if raw["stage"] == "sft":
            methods.add(raw.get("peft", {}).get("method", "full"))
    assert {"full", "lora", "dora", "qlora", "prompt_tuning", "p_tuning", "prefix", "freeze"} <= methods


def test_help_config_lists_every_field_with_help(capsys) -> None:
    rows = describe_fields(SftConfig)
    keys = {row[0] for row in rows}
    for fixed in (
        "model.path",
        "data.train",
        "data.eval",
        "output_dir",
        "train.max_steps",
        "train.epochs",
        "checkpoint.every",
        "checkpoint.keep",
        "resume",
        "seed",
    ):
        assert fixed in keys
    assert all(help_text for _, _, _, help_text in rows), [r[0] for r in rows if not r[3]]
    assert main(["train", "--help-config", "sft"]) == 0
    out = capsys.readouterr().out
    assert "optim.lr" in out and "Peak learning rate." in out and "default: 2e-05" in out
    assert set(STAGE_CONFIGS) >= {"sft", "pretrain"}


def test_cli_reports_config_errors_without_traceback(capsys) -> None:
    assert main(["train", "--help-config", "nope"]) == 2
    assert "unknown stage" in capsys.readouterr().err
