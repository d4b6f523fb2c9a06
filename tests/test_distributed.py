"""The sharded strategies on CPU (gloo), launched as CI cannot avoid launching them: `posttrain train CONFIG --nproc 2`.

Each 2-process run must equal the 1-process run with the same global batch (losses per step, final weights),
must really be what it says (the log line that the strategy writes from the prepared model: FSDP units and the
share of parameters this process holds, the DeepSpeed engine and its ZeRO optimizer), and its checkpoints must
resume exactly. accelerate's own FSDP/DeepSpeed paths silently fall back to DDP or to independent copies on CPU
(shared/research/cpu-distributed.md), so these tests are what keeps the strategies honest.

SGD at a large learning rate: the update is proportional to the gradient, so the 2-process weights differ from the
1-process ones only by the rounding of the gradient's summation order (Adam would divide that rounding by the
tiny gradient of a rarely seen embedding row and amplify it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import REPO, sft_config, train_in_subprocess, write_config
from safetensors.torch import load_file
from torch.testing import assert_close

from posttrain.cli import main
from posttrain.config import ConfigError, load_config
from posttrain.recipes import dpo, sft
from posttrain.runtime.distributed import free_loopback_port

STRATEGIES = {
    "fsdp": ["distributed.strategy=fsdp"],
    "zero2": ["distributed.strategy=deepspeed", "distributed.zero_stage=2"],
    "zero3": ["distributed.strategy=deepspeed", "distributed.zero_stage=3"],
}
# What each strategy's log line must say about the prepared model on 2 processes.
WRAPPED = {
    "fsdp": r"fsdp over 2 process\(es\): \d+ FSDP units, this process holds ([\d,]+) of ([\d,]+) parameter",
    "zero2": r"deepspeed over 2 process\(es\): DeepSpeedEngine, ZeRO-2, DeepSpeedZeroOptimizer, .* holds ([\d,]+) of ([\d,]+)",
    "zero3": r"deepspeed over 2 process\(es\): DeepSpeedEngine, ZeRO-3, DeepSpeedZeroOptimizer_Stage3, .* holds ([\d,]+) of ([\d,]+)",
}
SGD = dict(optim__name="sgd", optim__lr=0.5, optim__momentum=0.0, train__grad_accum=2, train__max_steps=3)


def _metrics(run: Path, key: str = "loss") -> list[dict[str, Any]]:
    """The run's metric records that hold ``key``: training steps by default, evaluations with ``eval_loss``."""
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [record for record in records if key in record]


def _two_processes(config: Any, *overrides: str) -> subprocess.CompletedProcess:
    result = train_in_subprocess(config, "--nproc", "2", *overrides, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _launched(command: list[str]) -> subprocess.CompletedProcess:
    """A launcher command (torchrun's, deepspeed's) run from the repository, one thread per process."""
    return subprocess.run(
        command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )


def _assert_wrapped(strategy: str, stderr: str) -> None:
    found = re.search(WRAPPED[strategy], stderr)
    assert found, f"no '{WRAPPED[strategy]}' line in the log:\n{stderr[-3000:]}"
    held, total = (int(group.replace(",", "")) for group in found.groups())
    if strategy != "zero2":  # ZeRO-2 shards optimizer states and gradients, not the parameters
        assert held < total * 0.6, f"{strategy}: this process holds {held} of {total} elements: not sharded"


def _assert_same_run(one: Path, two: Path, keys: tuple[str, ...] = ("loss",)) -> None:
    first, second = _metrics(one), _metrics(two)
    assert len(first) == len(second) == 3
    for key in keys:
        # atol: a DPO margin is 0 at the first step (the policy is its reference), up to the rounding of the sums.
        assert_close(
            torch.tensor([r[key] for r in second]), torch.tensor([r[key] for r in first]), rtol=1e-5, atol=1e-6
        )
    weights_one = load_file(str(one / "model" / "model.safetensors"))
    weights_two = load_file(str(two / "model" / "model.safetensors"))
    assert weights_one.keys() == weights_two.keys()  # tied embeddings stay tied through the gather
    for name in weights_one:
        assert_close(weights_two[name], weights_one[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_sft_on_two_processes_equals_one(strategy, toy, micro_model, tmp_path) -> None:
    """Held-out evaluation included, on 29 examples: the processes get 15 and 14 (a batch count that differs), which
    a sharded model survives only because evaluation gathers it whole first."""
    settings = dict(SGD, data__eval_fraction=0.07, train__eval_every=2)
    sft.run(sft_config(micro_model, toy.sft, tmp_path / "one", train__batch_size=4, **settings))
    config = sft_config(micro_model, toy.sft, tmp_path / "two", train__batch_size=2, **settings)
    result = _two_processes(config, *STRATEGIES[strategy])
    _assert_wrapped(strategy, result.stderr)
    assert "process 1 of 2" in result.stderr and "process 0 of 2" in result.stderr
    _assert_same_run(tmp_path / "one", tmp_path / "two")
    evaluations = [[r["eval_loss"] for r in _metrics(tmp_path / run, "eval_loss")] for run in ("one", "two")]
    # The checkpoint's shards, merged by `posttrain export --checkpoint` in this one process, are the gathered model.
    assert main(["export", str(tmp_path / "two"), "--checkpoint", "step-000003", "--out", str(tmp_path / "ex")]) == 0
    exported = load_file(str(tmp_path / "ex" / "model.safetensors"))
    gathered = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert exported.keys() == gathered.keys()
    for name in gathered:
        assert torch.equal(exported[name], gathered[name]), name
    assert len(evaluations[0]) == 2
    assert_close(torch.tensor(evaluations[1]), torch.tensor(evaluations[0]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_dpo_on_two_processes_equals_one(strategy, toy, micro_model, tmp_path) -> None:
    """A frozen reference (its log-probs computed once before sharding) and pairs as the unit of the batch."""
    dpo.run(sft_config(micro_model, toy.prefs, tmp_path / "one", stage="dpo", train__batch_size=4, **SGD))
    config = sft_config(micro_model, toy.prefs, tmp_path / "two", stage="dpo", train__batch_size=2, **SGD)
    result = _two_processes(config, *STRATEGIES[strategy])
    _assert_wrapped(strategy, result.stderr)
    _assert_same_run(tmp_path / "one", tmp_path / "two", keys=("loss", "rewards/margin", "logps/chosen"))


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_grpo_on_two_processes_equals_one(strategy, toy, micro_model, tmp_path) -> None:
    """Online RL: each process samples its own prompts with the sharded policy gathered, scores them and
    normalises the loss over every process's tokens. Greedy sampling (top_k 1) makes the rollouts the same in both
    runs; then every group's responses are equal and GRPO's advantages zero, so an entropy bonus gives the update
    its gradient (through the same sampled tokens, the same normaliser and the same sharded step)."""
    from posttrain.recipes import ppo

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(toy.prompts.read_text().splitlines(keepends=True)[:16]))
    settings = dict(
        SGD,
        stage="ppo",
        algorithm__advantage="grpo",
        algorithm__entropy_coef=0.5,
        algorithm__prompts_per_step=4,
        sampling__num_samples=2,
        sampling__max_new_tokens=6,
        sampling__top_k=1,
        reward__function="test_ppo:prompt_length_reward",
        # 3 held-out prompts: greedy answers generated 2 on one process and 1 on the other, a sharded policy's
        # forwards then unequal in number (ZeRO-3 hung here while its hooks still fetched per forward).
        data__eval_fraction=0.2,
        train__eval_every=3,
    )
    ppo.run(sft_config(micro_model, prompts, tmp_path / "one", train__batch_size=4, **settings))
    config = sft_config(micro_model, prompts, tmp_path / "two", train__batch_size=2, **settings)
    result = _two_processes(config, *STRATEGIES[strategy])
    _assert_wrapped(strategy, result.stderr)
    _assert_same_run(tmp_path / "one", tmp_path / "two", keys=("loss", "reward", "entropy", "response_length"))
    held_out = [[r["eval_reward"] for r in _metrics(tmp_path / run, "eval_reward")] for run in ("one", "two")]
    assert len(held_out[0]) == 1 and held_out[1] == pytest.approx(held_out[0], abs=1e-6)
    initial = load_file(str(micro_model / "model.safetensors"))
    trained = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert any(not torch.equal(trained[name], initial[name]) for name in initial)  # the update did move weights


def test_the_deepspeed_launcher_starts_the_same_run(toy, micro_model, tmp_path) -> None:
    """`deepspeed --module posttrain train ...` (it passes --local_rank to every process) trains what one process does."""
    sft.run(sft_config(micro_model, toy.sft, tmp_path / "one", train__batch_size=4, **SGD))
    config_path = write_config(
        sft_config(micro_model, toy.sft, tmp_path / "two", train__batch_size=2, **SGD), tmp_path / "c.yaml"
    )
    deepspeed = Path(sys.executable).parent / "deepspeed"
    result = _launched(
        [
            str(deepspeed),
            "--num_accelerators",
            "2",
            "--master_port",
            str(free_loopback_port()),
            "--module",
            "posttrain",
            "train",
            str(config_path),
            *STRATEGIES["zero2"],
        ]
    )
    assert result.returncode == 0, result.stderr[-4000:]
    _assert_wrapped("zero2", result.stderr)
    _assert_same_run(tmp_path / "one", tmp_path / "two")


def test_rejection_sampling_splits_the_prompts_over_processes(toy, micro_model, tmp_path) -> None:
    """Each process samples its share of the prompts; every row comes back, in the prompts' order, and the
    fine-tuning round runs sharded."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(toy.prompts.read_text().splitlines(keepends=True)[:9]))  # 5 and 4 per process
    config = sft_config(
        micro_model,
        prompts,
        tmp_path / "rs",
        stage="rejection_sampling",
        train__max_steps=1,
        train__batch_size=2,
        sampling__num_samples=2,
        sampling__max_new_tokens=4,
        rejection__require_finished=False,
    )
    result = _two_processes(config, *STRATEGIES["fsdp"])
    _assert_wrapped("fsdp", result.stderr)
    sampled = [json.loads(line) for line in (tmp_path / "rs" / "samples.jsonl").read_text().splitlines()]
    asked = [json.loads(line) for line in prompts.read_text().splitlines()]
    assert [row["messages"][-1]["content"] for row in sampled] == [row["messages"][-1]["content"] for row in asked]
    assert all(len(row["samples"]) == 2 for row in sampled)
    assert (tmp_path / "rs" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_one_process_under_a_sharded_strategy_is_the_replicated_run(strategy, toy, micro_model, tmp_path) -> None:
    """A one-process run under fsdp or deepspeed (a process group of one) trains as without it: the strategy changes
    where parameters live, not the arithmetic (FSDP2 bit for bit; ZeRO-3 flattens, so to rounding)."""
    # Adam for FSDP2, whose arithmetic is the same to the bit; SGD for ZeRO-3, whose flattened buffers round
    # differently, which Adam would amplify on rarely trained rows.
    settings = dict(SGD, optim__name="adamw", optim__lr=1e-2) if strategy == "fsdp" else SGD
    chosen = {
        "fsdp": dict(distributed__strategy="fsdp"),
        "zero3": dict(distributed__strategy="deepspeed", distributed__zero_stage=3),
    }
    sft.run(sft_config(micro_model, toy.sft, tmp_path / "ddp", **settings))
    _one_process(sft_config(micro_model, toy.sft, tmp_path / strategy, **chosen[strategy], **settings))
    replicated = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    sharded = load_file(str(tmp_path / strategy / "model" / "model.safetensors"))
    assert replicated.keys() == sharded.keys()
    losses = [[r["loss"] for r in _metrics(tmp_path / run)] for run in ("ddp", strategy)]
    if strategy == "fsdp":
        assert losses[1] == losses[0]
        assert all(torch.equal(sharded[name], replicated[name]) for name in replicated)
    else:
        assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-6, atol=0)
        for name in replicated:
            assert_close(sharded[name], replicated[name], rtol=1e-5, atol=1e-6)


def _one_process(config: Any) -> subprocess.CompletedProcess:
    """A one-process fsdp/deepspeed run in a fresh process: its process group of one lives as long as the process,
    and after one in the test process the suite's later training ran 2.5x slower (the PPO learning test: 60 s
    alone, 152 s after)."""
    result = train_in_subprocess(config, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return result


# Imported by every process of the launched run (PYTHONPATH): the process of rank KILL_RANK SIGKILLs itself right
# after step KILL_STEP has ended, a crash at an exact point whatever the machine's load.
_SITECUSTOMIZE = """
import os, signal
if os.environ.get("RANK") == os.environ.get("KILL_RANK"):
    from posttrain.runtime.trainer import Runtime
    end_step = Runtime.end_step
    def end_step_then_kill(self, *args, **kwargs):
        end_step(self, *args, **kwargs)
        if self.global_step == int(os.environ["KILL_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)
    Runtime.end_step = end_step_then_kill
"""


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_a_killed_process_stops_the_job_and_the_run_resumes_exactly(strategy, toy, micro_model, tmp_path) -> None:
    settings = dict(SGD, train__max_steps=6, train__batch_size=2, checkpoint__every=2)
    uninterrupted = sft_config(micro_model, toy.sft, tmp_path / "whole", **settings)
    _two_processes(uninterrupted, *STRATEGIES[strategy])

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    config_path = write_config(sft_config(micro_model, toy.sft, tmp_path / "killed", **settings), tmp_path / "k.yaml")
    command = [sys.executable, "-m", "posttrain", "train", str(config_path), "--nproc", "2", *STRATEGIES[strategy]]
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(hooks), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
        "KILL_RANK": "1",
        "KILL_STEP": "3",
    }
    started = time.monotonic()
    killed = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0
    assert "process 1 of 2 failed (exit code -9)" in killed.stderr, killed.stderr[-3000:]
    assert time.monotonic() - started < 120  # startup included; the kill itself ends the job in about a second
    checkpoints = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert checkpoints == ["step-000002"], checkpoints  # the last complete one, and nothing half-written

    resumed = subprocess.run(  # the same command, as the failure message says
        command,
        cwd=REPO,
        env={**environment, "KILL_RANK": "none"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step-000002" in resumed.stderr
    whole = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    after_crash = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    for name in whole:
        assert torch.equal(after_crash[name], whole[name]), name
    assert [r["loss"] for r in _metrics(tmp_path / "killed")] == [r["loss"] for r in _metrics(tmp_path / "whole")]


# One rank of a launched job whose engine caches the group in a module global, as DTensor's sharding caches do
# for FSDP2 and DeepSpeed does for ZeRO-3: the group outlives destroy_process_group into the interpreter's teardown.
_RANK_THAT_HOLDS_ITS_GROUP = """
import atexit, os, sys
import torch.distributed as dist
from posttrain.cli import _end_launched_process

out, rank = sys.argv[1], os.environ["RANK"]
dist.init_process_group("gloo")

class EngineCache:
    def __init__(self, group, marker):
        # `open` kept on the object: the teardown may have cleared this module's globals before __del__ runs
        self.group, self.marker, self.touch = group, marker, open
    def __del__(self):  # runs only in the interpreter's teardown
        self.touch(self.marker, "w").close()

CACHE = EngineCache(dist.group.WORLD, os.path.join(out, "teardown-" + rank))
atexit.register(lambda: open(os.path.join(out, "atexit-" + rank), "w").close())
print("saved", end="")  # no newline: in a pipe it leaves only if the process flushes before it ends
_end_launched_process()
print("after the end")
"""


def test_a_launched_process_ends_after_its_exit_handlers_without_the_interpreters_teardown(tmp_path) -> None:
    """A finished job's processes must not end in Python's module teardown, where an engine's cached group still
    runs gloo/NCCL threads and a finished, saved job aborted (exit -6). They end right after their exit handlers,
    with their output flushed: the teardown's finalizer never runs, the handler and the unterminated line do."""
    script = tmp_path / "rank.py"
    script.write_text(_RANK_THAT_HOLDS_ITS_GROUP)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = _launched([*command, str(script), str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved") == 2 and "after the end" not in result.stdout, result.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != script.name) == ["atexit-0", "atexit-1"]


def test_fsdp_checkpoint_resumes_on_another_process_count(toy, micro_model, tmp_path) -> None:
    """torch.distributed.checkpoint reshards on load: a run written by 2 processes continues on 1 (same global batch)."""
    settings = dict(SGD, train__max_steps=4, checkpoint__every=2, distributed__strategy="fsdp")
    _one_process(sft_config(micro_model, toy.sft, tmp_path / "one", train__batch_size=4, **settings))
    two = sft_config(micro_model, toy.sft, tmp_path / "two", train__batch_size=2, **settings)
    _two_processes(two, "train.max_steps=2")
    _one_process(sft_config(micro_model, toy.sft, tmp_path / "two", train__batch_size=4, **settings))
    one = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    continued = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    for name in one:
        assert_close(continued[name], one[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["distributed.zero_stage=2"], "zero_stage=2 is a DeepSpeed option"),
        (["distributed.strategy=fsdp", "distributed.offload=optimizer"], "FSDP2 offloads parameters, gradients"),
        (["distributed.strategy=deepspeed", "distributed.offload=all", "distributed.zero_stage=2"], "only ZeRO-3"),
        (["distributed.strategy=deepspeed", "distributed.offload=optimizer"], "needs distributed.zero_stage >= 1"),
        (["distributed.reshard_after_forward=false"], "is an FSDP option"),
        (["distributed.offload=all"], "needs a sharded strategy"),
        (["distributed.strategy=fsdp", "peft.method=qlora"], "cannot be sharded here"),
    ],
)
def test_wrong_combinations_are_config_errors(overrides, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["stage=sft", "model.path=m", "data.train=d.jsonl", *overrides])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nnodes", "2"], "every machine needs --master-addr"),
        (["--nnodes", "2", "--node-rank", "2", "--master-addr", "10.0.0.1"], "--node-rank 2 is not in 0..1"),
    ],
)
def test_launcher_flags_that_cannot_form_a_group_exit_2(flags, message, micro_model, toy, capsys) -> None:
    code = main(["train", "sft", f"model.path={micro_model}", f"data.train={toy.sft}", *flags])
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0], error


def test_a_group_of_another_size_than_launched_refuses_to_train(monkeypatch) -> None:
    """What independent copies look like from inside: torchrun said 2 processes, the group has 1."""
    from posttrain.runtime.distributed import check_world_size

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="group of 1 process.*WORLD_SIZE=2"):
        check_world_size(1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("POSTTRAIN_EXPECTED_WORLD_SIZE", "4")
    with pytest.raises(RuntimeError, match="POSTTRAIN_EXPECTED_WORLD_SIZE=4"):
        check_world_size(1)


def test_the_config_offers_exactly_the_strategies_the_runtime_has() -> None:
    """config.py sits below runtime/ (it cannot import the strategies' table), so the two lists are checked here."""
    from typing import get_args

    from posttrain.config import DistributedBlock
    from posttrain.runtime.distributed import STRATEGIES

    assert list(get_args(DistributedBlock.model_fields["strategy"].annotation)) == list(STRATEGIES)


def test_a_deepspeed_checkpoint_refuses_another_process_count(toy, micro_model, tmp_path) -> None:
    """ZeRO partitions are per process: resuming them on another count is refused in one line, never loaded wrong."""
    settings = dict(SGD, train__max_steps=2, distributed__strategy="deepspeed", distributed__zero_stage=2)
    _two_processes(sft_config(micro_model, toy.sft, tmp_path / "run", train__batch_size=2, **settings))
    longer = sft_config(
        micro_model, toy.sft, tmp_path / "run", train__batch_size=4, **{**settings, "train__max_steps": 4}
    )
    refused = train_in_subprocess(longer, env={"OMP_NUM_THREADS": "1"})
    assert refused.returncode == 2
    error = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, refused.stderr[-3000:]
    assert "written by 2 DeepSpeed processes and this run has 1: resume with --nproc 2" in error[0]
