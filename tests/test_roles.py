"""Online RL's roles placed on Ray (``distributed.placement: ray``) on a local Ray runtime on CPU: the same weights
as every role in one process, the engines' weights after a sync bit for bit the trainer's, a stale engine refused,
a dead role failing the run fast (or restarted), and the asynchronous mode's off-policy bookkeeping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import prompts_file, sft_config, train_in_subprocess
from safetensors.torch import load_file

from posttrain.config import ConfigError
from posttrain.recipes import ppo
from posttrain.roles import StaleWeights
from posttrain.roles.workers import Sampler, build_role, pack_weights, trainable_weights
from posttrain.rollout import SamplingSettings

ray = pytest.importorskip("ray")  # the dev extra installs it; CI fails on any skip

REWARD = f"{__name__}:length_reward"


def length_reward(prompt: str, response: str, reference: str | None) -> float:
    """Differs between the untrained micro model's samples, so every group has an advantage to learn from."""
    return len(response.split()) / 4.0


@pytest.fixture(scope="module")
def ray_session() -> Any:
    """One local Ray runtime for the module (each start costs 7-10 s); runs join it. Its workers import this
    test module (the reward above) through PYTHONPATH."""
    tests = str(Path(__file__).parent)
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests, previous) if p)
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous


def rl_config(model: Path, data: Path, out: Path, **overrides: Any) -> Any:
    defaults = {
        "stage": "ppo",
        "sampling__num_samples": 4,
        "sampling__max_new_tokens": 6,
        "algorithm__prompts_per_step": 4,
        "algorithm__advantage": "grpo",
        "algorithm__kl_mode": "loss",
        "algorithm__kl_estimator": "k3",
        "train__batch_size": 8,
        "train__grad_accum": 2,
        "train__max_steps": 3,
        "reward__function": REWARD,
        "watch__gold": "toy",
        "optim__lr": 1e-2,
    }
    return sft_config(model, data, out, **{**defaults, **overrides})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


ON_RAY = {"distributed__placement": "ray", "distributed__call_timeout_s": 120}
ESTIMATORS = {
    "grpo": {},
    "ppo": {"algorithm__advantage": "gae", "algorithm__kl_mode": "reward", "algorithm__kl_estimator": "k1"},
}


def _cli_overrides(micro_model: Path, data: Path, out: Path) -> list[str]:
    return [
        f"model.path={micro_model}",
        f"data.train={data}",
        f"output_dir={out}",
        "sampling.num_samples=4",
        "sampling.max_new_tokens=6",
        "algorithm.prompts_per_step=4",
        "train.batch_size=8",
        "train.max_steps=3",
        "train.eval_every=2",
        f"reward.function={REWARD}",
        "optim.lr=1e-2",
        "logging.progress=false",
    ]


@pytest.mark.parametrize("estimator", ["grpo", "ppo"])
def test_ray_placement_trains_to_the_weights_of_one_process(
    estimator, ray_session, toy, micro_model, tmp_path
) -> None:
    """The same config and seed, every role in the training process or the rollout engines, the reference and
    the reward each in a Ray actor: the same samples (the rollout's statistics), the same metrics and held-out
    evaluation, and final weights within 1e-4; the weights really moved. GRPO through ``posttrain train
    configs/grpo.yaml`` with two engines; PPO (its critic trains with the policy) with one."""
    from posttrain.cli import main

    data = prompts_file(toy, tmp_path / "p.jsonl")
    engines = 2 if estimator == "grpo" else 1
    if estimator == "grpo":
        for name, extra in (
            ("local", []),
            ("ray", ["distributed.placement=ray", f"distributed.roles.rollout.num_engines={engines}"]),
        ):
            assert (
                main(
                    [
                        "train",
                        "posttrain/configs/grpo.yaml",
                        *_cli_overrides(micro_model, data, tmp_path / name),
                        *extra,
                    ]
                )
                == 0
            )
    else:
        settings = ESTIMATORS[estimator]
        ppo.run(rl_config(micro_model, data, tmp_path / "local", **settings))
        ppo.run(rl_config(micro_model, data, tmp_path / "ray", **settings, **ON_RAY))
    placed = json.loads((tmp_path / "ray" / "roles.json").read_text())
    expected = {f"rollout-{i}": "ray" for i in range(engines)} | {"reference": "ray", "reward": "ray"}
    assert {name: role["placement"] for name, role in placed.items()} == expected
    assert len({role["pid"] for role in placed.values()} | {os.getpid()}) == len(expected) + 1
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["placement"]["weight_sync_s_mean"] > 0
    local, remote = metrics(tmp_path / "local"), metrics(tmp_path / "ray")
    assert len(local) == len(remote)
    for a, b in zip(local, remote):
        for key in ("reward", "response_length", "gold_reward", "kl", "eval_reward", "eval_gold_reward"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a, b)
    initial, trained = weights(micro_model), weights(tmp_path / "local" / "model")
    assert max(float((trained[k] - initial[k]).abs().max()) for k in initial) > 1e-3
    for key, value in weights(tmp_path / "ray" / "model").items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=1e-4, msg=key)


def test_a_trainer_group_of_two_processes_on_ray_trains_like_one_local_process(toy, micro_model, tmp_path) -> None:
    """``--nproc 2`` with the roles on Ray: the main process alone starts Ray and the actors; the other reaches
    them through it (its prompts, rows and scores gathered and scattered). Keyed samples make each process's share
    what one process samples; SGD keeps float noise at noise: the metrics and the weights are one process's."""
    data = prompts_file(toy, tmp_path / "p.jsonl")
    sgd = {"optim__name": "sgd", "optim__lr": 0.5, "optim__momentum": 0.0, "train__batch_size": 8}
    ppo.run(rl_config(micro_model, data, tmp_path / "one", **sgd))
    two = rl_config(micro_model, data, tmp_path / "two", **{**sgd, "train__batch_size": 4})
    result = train_in_subprocess(two, "--nproc", "2", "distributed.placement=ray", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "process 1 of 2" in result.stderr
    placed = json.loads((tmp_path / "two" / "roles.json").read_text())
    assert {name: role["placement"] for name, role in placed.items()} == {
        "rollout-0": "ray",
        "reference": "ray",
        "reward": "ray",
    }
    one, two_records = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == len(two_records) == 3
    for a, b in zip(one, two_records):
        for key in ("loss", "reward", "response_length", "kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a, b)
    expected = weights(tmp_path / "one" / "model")
    assert max(float((expected[k] - weights(micro_model)[k]).abs().max()) for k in expected) > 1e-3
    for key, value in weights(tmp_path / "two" / "model").items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-5, msg=key)


def test_a_sync_gives_the_engine_the_trainers_weights_bit_for_bit_and_a_stale_engine_refuses(
    micro_model, toy, tmp_path
) -> None:
    """The plain classes, without Ray: a LoRA policy syncs only its adapter; after the sync the engine's trainable
    weights equal the trainer's bit for bit; an engine asked for a newer version than it holds refuses to sample,
    and a sync that does not move the version forward is refused."""
    data = prompts_file(toy, tmp_path / "p.jsonl")
    config = rl_config(micro_model, data, tmp_path / "run", peft__method="lora")
    trainer_side = build_role("rollout", config, [])
    engine = build_role("rollout", config, [])
    assert isinstance(engine, Sampler)
    moved = trainable_weights(trainer_side.policy)
    assert moved and all("lora_" in name for name in moved)  # only the adapter travels
    with torch.no_grad():
        for tensor in moved.values():
            tensor.add_(torch.randn_like(tensor))
    assert engine.load_weights(1, pack_weights(moved)) == 1
    for name, value in engine.weights().items():
        assert torch.equal(value, moved[name]), name
    settings = SamplingSettings(2, 4, 1.0)
    with pytest.raises(StaleWeights, match="version 1; this step needs version 2"):
        engine.generate([[1, 2, 3]], settings, [7], 2)
    assert len(engine.generate([[1, 2, 3]], settings, [7], 1)[0]) == 2
    with pytest.raises(StaleWeights, match="already at version 1"):
        engine.load_weights(1, pack_weights(moved))


def test_bfloat16_weights_travel_exactly(micro_model, toy, tmp_path) -> None:
    """numpy has no bfloat16: those tensors travel as their bit patterns and arrive identical."""
    from posttrain.roles.workers import unpack_weights

    tensor = torch.randn(5, 3).to(torch.bfloat16)
    back = unpack_weights(pack_weights({"w": tensor}))["w"]
    assert back.dtype == torch.bfloat16 and torch.equal(back, tensor)


def test_async_mode_samples_one_step_behind_with_the_behaviour_log_probs(
    ray_session, toy, micro_model, tmp_path
) -> None:
    """algorithm.async: step t's rollout is sampled by weights of version t-1 (t >= 1), which the run logs as
    ``rollout_version_lag``; the first step's behaviour log-probs (the engine's, on the trainer's own weights) give
    a first update with ratio 1 (approx_kl 0 within float noise), the later ones an update off-policy by one step
    (approx_kl above noise: the behaviour policy is not the current one, and the ratio corrects for it)."""
    data = prompts_file(toy, tmp_path / "p.jsonl")
    ppo.run(rl_config(micro_model, data, tmp_path / "async", **ON_RAY, algorithm__async=True))
    steps = [r for r in metrics(tmp_path / "async") if "approx_kl" in r]
    assert [r["rollout_version_lag"] for r in steps] == [0, 1, 1]
    assert steps[0]["approx_kl"] == pytest.approx(0.0, abs=1e-7)
    assert all(r["approx_kl"] > 1e-6 for r in steps[1:]), [r["approx_kl"] for r in steps]
    assert all(r["rollout_wait_s"] >= 0 and r["weight_sync_s"] > 0 for r in steps)


def test_async_needs_engines_of_their_own() -> None:
    from posttrain.config import load_config

    with pytest.raises(ConfigError, match="algorithm.async=true .* distributed.placement=ray"):
        load_config(None, ["stage=ppo", "model.path=m", "data.train=d", "algorithm.async=true"])
    with pytest.raises(ConfigError, match="distributed.restarts places roles on Ray"):
        load_config(None, ["stage=ppo", "model.path=m", "data.train=d", "distributed.restarts=1"])
    with pytest.raises(ConfigError, match="stage sft has none"):
        load_config(None, ["stage=sft", "model.path=m", "data.train=d", "distributed.placement=ray"])


def _train_command(micro_model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "posttrain",
        "train",
        "posttrain/configs/grpo.yaml",
        f"model.path={micro_model}",
        f"data.train={data}",
        f"output_dir={out}",
        "sampling.max_new_tokens=6",
        "sampling.num_samples=4",
        "algorithm.prompts_per_step=4",
        "train.batch_size=8",
        "train.max_steps=400",
        "train.eval_every=1000",
        "logging.progress=false",
        "reward.function=toy_format",
        "distributed.placement=ray",
        "distributed.roles.rollout.num_engines=1",
        *extra,
    ]


def test_a_killed_role_is_restarted_then_fails_the_run_fast(toy, micro_model, tmp_path) -> None:
    """``posttrain train`` with roles on Ray (its own local Ray runtime) and ``distributed.restarts=1``; the rollout
    engine's actor is killed with SIGKILL mid-run. The first time a new engine is built, takes the last weights,
    and the run goes on; the second time no restart is left: the run exits non-zero within 60 s, its last line
    naming the role."""
    data = prompts_file(toy, tmp_path / "p.jsonl")
    out = tmp_path / "run"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    log = tmp_path / "stderr.log"
    with open(log, "w") as stderr_file:  # a file, not a pipe: a full pipe would stall the run
        process = subprocess.Popen(
            _train_command(micro_model, data, out, "distributed.restarts=1"),
            stdout=subprocess.DEVNULL,
            stderr=stderr_file,
            env=environment,
        )

    def rollout_pid() -> int:
        return int(json.loads((out / "roles.json").read_text())["rollout-0"]["pid"])

    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            assert process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        steps_before = len(metrics(out))
        first = rollout_pid()
        os.kill(first, signal.SIGKILL)
        killed = time.time()
        while len(metrics(out)) < steps_before + 3:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.time() - killed < 90, "the run did not go on after the restart"
            time.sleep(0.2)
        assert "ray: role rollout-0 (Ray actor) died" in log.read_text()
        second = rollout_pid()  # roles.json follows the restart
        assert second != first
        os.kill(second, signal.SIGKILL)
        killed = time.time()
        process.wait(timeout=60)
        assert time.time() - killed < 60
        assert process.returncode != 0
        stderr = log.read_text()
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("error: role rollout-0 (Ray actor) died"), stderr[-2000:]
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # the run shuts its Ray runtime down
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
