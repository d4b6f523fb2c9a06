"""Every variant is one registry entry, and the config's allowed values are that registry's keys.

Adding a DPO loss, an advantage estimator, a KL estimator, a loss aggregation or a data format is one entry in one
table (CONTRIBUTING.md, "Where to add"); these tests fail when a config field, a validator or a help text keeps its
own list instead.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, get_args

import pytest

from posttrain import losses, rl
from posttrain.config import (
    KL_ESTIMATOR_BY_MODE,
    AlgorithmBlock,
    ConfigError,
    DataConfig,
    DpoBlock,
    RewardSource,
    build_config,
)
from posttrain.data import formats
from posttrain.rewards import BUILTIN_FUNCTIONS


def _choices(block: Any, field: str) -> tuple[Any, ...]:
    return get_args(block.model_fields[field].annotation)


@pytest.mark.parametrize(
    ("block", "field", "registry", "extra"),
    [
        (AlgorithmBlock, "advantage", rl.ADVANTAGES, ()),
        (AlgorithmBlock, "kl_estimator", rl.KL_ESTIMATORS, ()),
        (AlgorithmBlock, "loss_aggregation", rl.LOSS_AGGREGATIONS, ()),
        (DpoBlock, "loss", losses.DPO_LOSSES, ()),
        (DataConfig, "format", formats.FORMATS, ("auto",)),
    ],
)
def test_config_choices_are_the_registry_keys(
    block: Any, field: str, registry: dict[str, Any], extra: tuple[str, ...]
) -> None:
    """The field's Literal lists exactly the registry's names, in the registry's order (detection order for formats)."""
    assert _choices(block, field) == (*extra, *registry)
    default = block.model_fields[field].default
    assert default in extra or default in registry


def test_kl_defaults_per_mode_name_real_estimators() -> None:
    assert set(KL_ESTIMATOR_BY_MODE) == set(_choices(AlgorithmBlock, "kl_mode"))
    assert set(KL_ESTIMATOR_BY_MODE.values()) <= set(rl.KL_ESTIMATORS)


def test_built_in_reward_functions_in_the_help_are_the_registered_ones() -> None:
    """``reward.function`` is free text (module:name), so no Literal: its help names the built-ins instead."""
    help_text = RewardSource.model_fields["function"].description or ""
    listed = re.search(r"built-in name: ([\w, ]+)\.", help_text)
    assert listed, help_text
    assert [name.strip() for name in listed.group(1).split(",")] == list(BUILTIN_FUNCTIONS)


def test_every_format_has_a_row_in_the_module_docstring_table() -> None:
    table = re.split(r"^=+ +=+$", formats.__doc__ or "", flags=re.MULTILINE)[1]  # between the table's two rules
    assert set(re.findall(r"^``(\w+)``", table, flags=re.MULTILINE)) == set(formats.FORMATS)
    assert formats.FORMAT_SIGNATURES.count(",") == len(formats.FORMATS) - 1


def _config(stage: str, **blocks: Any) -> Any:
    return build_config({"stage": stage, "model": {"path": "m"}, "data": {"train": "d.jsonl"}, **blocks})


@pytest.mark.parametrize("name", list(losses.DPO_LOSSES))
def test_each_dpo_loss_entry_drives_the_config(name: str) -> None:
    """An unset β is the entry's own default; label smoothing is accepted exactly by the entries that take it."""
    entry = losses.DPO_LOSSES[name]
    assert _config("dpo", dpo={"loss": name}).dpo.beta == entry.default_beta
    assert _config("dpo", dpo={"loss": name, "beta": 0.3}).dpo.beta == 0.3
    if entry.takes_label_smoothing:
        assert _config("dpo", dpo={"loss": name, "label_smoothing": 0.1}).dpo.label_smoothing == 0.1
    else:
        with pytest.raises(ConfigError, match="label_smoothing applies to loss"):
            _config("dpo", dpo={"loss": name, "label_smoothing": 0.1})


@pytest.mark.parametrize("name", list(rl.ADVANTAGES))
def test_each_advantage_entry_drives_the_config(name: str) -> None:
    """One sample per prompt is refused exactly for the estimators that compare groups; prompt learning exactly for
    those that train a critic."""
    entry = rl.ADVANTAGES[name]
    algorithm = {"advantage": name}
    if entry.needs_groups:
        with pytest.raises(ConfigError, match="num_samples >= 2"):
            _config("ppo", algorithm=algorithm, sampling={"num_samples": 1})
    else:
        _config("ppo", algorithm=algorithm, sampling={"num_samples": 1})
    prompt_tuning = {
        "algorithm": algorithm,
        "sampling": {"num_samples": 2},
        "peft": {"method": "prompt_tuning"},
        "data": {"train": "d.jsonl", "packing": False},
    }
    if entry.needs_critic:
        with pytest.raises(ConfigError, match="cannot train a critic"):
            _config("ppo", **prompt_tuning)
    else:
        _config("ppo", **prompt_tuning)


def test_registry_entries_are_frozen_records_of_plain_functions() -> None:
    """losses.py and rl.py hold plain functions and frozen dataclasses (they import only torch)."""
    for registry in (losses.DPO_LOSSES, rl.ADVANTAGES, rl.LOSS_AGGREGATIONS):
        for entry in registry.values():
            assert dataclasses.is_dataclass(entry) and entry.__dataclass_params__.frozen
    assert all(callable(fn) for fn in rl.KL_ESTIMATORS.values())
