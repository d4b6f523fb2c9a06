"""Online RL's roles and their placement (``distributed.placement``, ``distributed.roles``).

The policy trainer (with the critic) is the training process. The other roles are plain classes
(``roles.workers``): the rollout engines (:class:`~posttrain.roles.workers.Sampler`), the frozen reference and
the reward (:class:`~posttrain.roles.workers.Scorer`). ``placement: local`` keeps them all in the training process,
on the trained policy itself (today's behaviour and speed); ``placement: ray`` puts each in a Ray actor of its own
(``colocate_with: policy`` keeps one in the training process), built from the config with the same loading code.
:class:`Roles` is what the recipe talks to: the same calls whatever the placement.

Weight sync: after every update the trainer's trainable parameters (a LoRA policy's adapter only) go to every
engine with the policy's version; an engine refuses to sample below the version the step needs (the trainer's
own, or one behind it in asynchronous mode), and every sync is checked and has a timeout.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain.config import ConfigError, PpoConfig
from posttrain.data.packing import Row
from posttrain.data.records import Prompt
from posttrain.models.scoring import RolloutBatches
from posttrain.rewards import Reward, WeightedReward
from posttrain.roles.placement import (
    LocalRole,
    Pending,
    RayRole,
    RelayedRole,
    RoleFailed,
    TrainerGroup,
    ray_runtime,
)
from posttrain.roles.workers import Reference, Sampler, Scorer, StaleWeights, pack_weights, trainable_weights
from posttrain.rollout import Response, SamplingSettings

__all__ = ["RoleActor", "Roles", "RoleFailed", "Sampled", "StaleWeights", "local_roles", "placed_roles", "ray_actors"]

Role = LocalRole | RayRole | RelayedRole


@dataclass
class Sampled:
    """One rollout's responses (``groups[i]``: prompt ``i``'s) and, when asked for, the flat log-probs of their
    tokens under the weights that sampled them (``behaviour_logps``, in row order), and that weights' version."""

    groups: list[list[Response]]
    behaviour_logps: torch.Tensor | None
    version: int


@dataclass
class Roles:
    """The rollout engines, the reference (None without a KL anchor) and the scorer, wherever they run."""

    samplers: list[Role]
    reference: Role | None
    scorer: Role
    sync_timeout_s: float = 60.0
    version: int = 0
    sync_seconds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        has_gold, gold_needs_reference = self.scorer.submit("gold_info").result()
        # Called as rewards.WeightedReward and rewards.Reward are (held-out evaluation, gold_sum take them).
        self.reward: Any = _ScorerView(self.scorer)
        self.gold: Any = _GoldView(self.scorer, gold_needs_reference) if has_gold else None

    # ------------------------------------------------------------------------------------------ rollout engines
    def sync(self, policy: Any, version: int) -> None:
        """Every engine at ``version`` of ``policy``'s weights. In-process engines follow the policy they share the
        process with; the others get its trainable parameters, each acknowledging the version."""
        started = time.perf_counter()
        for sampler in self.samplers:
            if isinstance(sampler, LocalRole):
                sampler.instance.follow_policy(version)
        remote = [s for s in self.samplers if isinstance(s, RayRole)]
        relayed = [s for s in self.samplers if isinstance(s, RelayedRole)]
        acknowledged: dict[str, int] = {}
        if remote:
            packed = pack_weights(trainable_weights(policy))
            pending = [s.submit("load_weights", version, packed, timeout_s=self.sync_timeout_s) for s in remote]
            acknowledged = {s.name: answer.result() for s, answer in zip(remote, pending)}
        if relayed:  # a trainer group: its main process sends its weights (every process holds the same)
            payload = pack_weights(trainable_weights(policy)) if relayed[0].group.is_main else None
            for sampler in relayed:
                acknowledged[sampler.name] = sampler.submit_from_main(
                    "load_weights", version, payload, timeout_s=self.sync_timeout_s
                )
        for name, answer in acknowledged.items():
            if answer != version:
                raise RoleFailed(f"role {name} acknowledged weights of version {answer}, not {version}")
        self.version = version
        self.sync_seconds.append(time.perf_counter() - started)

    def submit_rollout(
        self,
        prompt_ids: Sequence[list[int]],
        settings: SamplingSettings,
        keys: Sequence[int],
        min_version: int,
        behaviour_temperature: float | None = None,
    ) -> Pending:
        """Start sampling ``prompt_ids`` (the engines take contiguous shares); ``.result()`` is a :class:`Sampled`.
        A sample depends on its key only, so the split does not change it."""
        shares = _split(len(prompt_ids), len(self.samplers))
        calls = []
        for sampler, (start, stop) in zip(self.samplers, shares):
            if start == stop:
                continue
            arguments = (list(prompt_ids[start:stop]), settings, list(keys[start:stop]), min_version)
            calls.append(sampler.submit("sample", *arguments, behaviour_temperature))

        def gather() -> Sampled:
            groups: list[list[Response]] = []
            logps: list[torch.Tensor] = []
            versions = []
            for call in calls:
                share, share_logps, version = call.result()
                groups += share
                versions.append(version)
                if share_logps is not None:
                    logps.append(share_logps)
            return Sampled(groups, torch.cat(logps) if logps else None, min(versions, default=self.version))

        return Pending(fetch=gather)

    def engine(self) -> Any:
        """The engines as one ``RolloutEngine`` (greedy evaluation answers), at the current version: in the
        training process, the engine on the trained policy itself."""
        if len(self.samplers) == 1 and isinstance(self.samplers[0], LocalRole):
            return self.samplers[0].instance.engine
        return _EngineView(self)

    # ------------------------------------------------------------------------------------ reference and reward
    def reference_logps(self, rows: list[Row], temperature: float) -> torch.Tensor:
        assert self.reference is not None, "no reference without a KL anchor"
        return self.reference.submit("logps", rows, temperature).result()

    # ------------------------------------------------------------------------------------------------- the end
    def all(self) -> list[Role]:
        return [*self.samplers, *([self.reference] if self.reference else []), self.scorer]

    def describe(self) -> dict[str, Any]:
        return {
            role.name: {"placement": "local" if isinstance(role, LocalRole) else "ray", "pid": role.pid()}
            for role in self.all()
        }

    def restarts(self) -> dict[str, int]:
        return {role.name: role.restarted for role in self.all() if not isinstance(role, LocalRole) and role.restarted}

    def close(self) -> None:
        for role in self.all():
            role.close()


def _split(count: int, parts: int) -> list[tuple[int, int]]:
    base, extra = divmod(count, parts)
    bounds, start = [], 0
    for part in range(parts):
        stop = start + base + (1 if part < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


class _EngineView:
    """``RolloutEngine`` over the roles' engines (held-out evaluation samples greedily through it)."""

    def __init__(self, roles: Roles) -> None:
        self.roles = roles

    def generate(
        self, prompt_ids: list[list[int]], settings: SamplingSettings, prompt_keys: list[int] | None = None
    ) -> list[list[Response]]:
        keys = prompt_keys if prompt_keys is not None else [0] * len(prompt_ids)
        return self.roles.submit_rollout(prompt_ids, settings, keys, self.roles.version).result().groups

    def sync_weights(self, model: Any) -> None:  # the recipe syncs through Roles.sync
        raise NotImplementedError


class _ScorerView:
    """The reward, as ``WeightedReward`` is called (``breakdown``, a call for totals), answered by the scorer role."""

    needs_reference = False  # checked where the scorer was built

    def __init__(self, scorer: Role) -> None:
        self.scorer = scorer

    def breakdown(
        self, messages: Sequence[Any], texts: Sequence[str], references: Sequence[str | None], finished: Sequence[bool]
    ) -> dict[str, list[float]]:
        return self.scorer.submit("breakdown", list(messages), list(texts), list(references), list(finished)).result()

    def __call__(
        self,
        messages: Sequence[Any],
        texts: Sequence[str],
        references: Sequence[str | None],
        finished: Sequence[bool] | None = None,
    ) -> list[float]:
        done = list(finished) if finished is not None else [True] * len(texts)
        return self.scorer.submit("total", list(messages), list(texts), list(references), done).result()


class _GoldView:
    """The gold reward as a ``Reward`` (``eval.verifiable.gold_sum`` calls it), answered by the scorer role."""

    name = "gold"

    def __init__(self, scorer: Role, needs_reference: bool) -> None:
        self.scorer, self.needs_reference = scorer, needs_reference

    def __call__(self, messages: Sequence[Any], texts: Sequence[str], references: Sequence[str | None]) -> list[float]:
        return self.scorer.submit("gold_scores", list(messages), list(texts), list(references)).result()


# ------------------------------------------------------------------------------------------------------ building
def local_roles(
    policy: Any,
    engine: Any,
    frozen_copy: Any,
    kl_coef: float,
    batches: RolloutBatches,
    reward: WeightedReward | None,
    gold: Reward | None,
) -> Roles:
    """Every role in the training process, on the trained policy itself (``placement: local``)."""
    reference = None
    if frozen_copy is not None or kl_coef:
        model = frozen_copy if frozen_copy is not None else policy
        reference = LocalRole("reference", Reference(model, frozen_copy is None, batches))
    sampler = LocalRole("rollout-0", Sampler(policy, engine, batches, version=0))
    return Roles([sampler], reference, LocalRole("reward", Scorer(reward, gold)))


@dataclass(frozen=True)
class RoleActor:
    """One Ray actor a ``placement: ray`` run starts for a role, with what it reserves (``launch.k8s`` sizes a
    cluster from the same list)."""

    role: str  # its block in distributed.roles, and the kind workers.build_role builds
    name: str  # as roles.json names it
    num_cpus: float
    num_gpus: float
    threads: int


def ray_actors(config: PpoConfig) -> list[RoleActor]:
    """The actors of a ``placement: ray`` run: one per rollout engine, the reference when there is a KL anchor
    (``algorithm.kl_coef`` not 0), and the reward; a role with ``colocate_with: policy`` runs in the trainer's
    process instead and reserves nothing."""
    roles = config.distributed.roles
    wanted: list[tuple[str, str, Any]] = []
    if roles.rollout.colocate_with is None:
        wanted += [("rollout", f"rollout-{i}", roles.rollout) for i in range(roles.rollout.num_engines)]
    if roles.reference.colocate_with is None and config.algorithm.kl_coef:
        wanted.append(("reference", "reference", roles.reference))
    if roles.reward.colocate_with is None:
        wanted.append(("reward", "reward", roles.reward))
    return [RoleActor(role, name, block.num_cpus, block.num_gpus, block.threads) for role, name, block in wanted]


def ray_roles(config: PpoConfig, every_prompt: list[Prompt], local: Roles, group: TrainerGroup | None) -> Roles:
    """``placement: ray``: each role not colocated with the policy in a Ray actor of its own, built from
    ``config``; the colocated ones are ``local``'s (this process's). In a trainer group (``group``) only the main
    process starts the actors; every process reaches them through it (``RelayedRole``), and an actor that fails
    to start fails every process."""
    distributed = config.distributed
    wanted = ray_actors(config)

    actors: dict[str, RayRole] = {}
    failure: BaseException | None = None
    if group is None or group.is_main:
        try:
            for wanted_actor in wanted:
                resources = {"num_cpus": wanted_actor.num_cpus, "num_gpus": wanted_actor.num_gpus}
                actors[wanted_actor.name] = RayRole(
                    wanted_actor.name,
                    wanted_actor.role,
                    config,
                    every_prompt,
                    resources,
                    wanted_actor.threads,
                    distributed.call_timeout_s,
                    distributed.restarts,
                )
        except Exception as error:
            failure = error
    if group is not None:
        failure = group.broadcast(failure)
    if failure is not None:
        for actor in actors.values():
            actor.close()
        raise failure

    def placed(name: str) -> Role:
        if group is None:
            return actors[name]
        return RelayedRole(name, actors.get(name), group)

    names = {actor.name for actor in wanted}
    samplers = [placed(n) for n in sorted(n for n in names if n.startswith("rollout-"))] or list(local.samplers)
    reference = placed("reference") if "reference" in names else local.reference
    scorer = placed("reward") if "reward" in names else local.scorer
    return Roles(samplers, reference, scorer, distributed.sync_timeout_s)


@contextmanager
def placed_roles(
    config: PpoConfig,
    every_prompt: list[Prompt],
    local: Roles,
    run_dir: Path,
    log: Any,
    world_size: int,
) -> Iterator[Roles]:
    """The roles where ``distributed.placement`` puts them, for as long as the run lasts: ``local`` as they are,
    or on Ray (started, or joined, by the main process; stopped at the end with the actors)."""
    if config.distributed.placement == "local":
        yield local
        return
    group = TrainerGroup() if world_size > 1 else None
    if group is not None and config.distributed.restarts:
        raise ConfigError(
            "distributed.restarts with a trainer group of several processes: a restart is not replayed to the "
            "group yet; use one trainer process or restarts=0"
        )
    with ExitStack() as scope:
        if group is None or group.is_main:
            cpus = sum(actor.num_cpus for actor in ray_actors(config))
            scope.enter_context(ray_runtime(config.distributed, run_dir, cpus + 1, log))
        roles = ray_roles(config, every_prompt, local, group)
        scope.callback(roles.close)
        if group is None or group.is_main:
            write_placement(roles, run_dir)
        yield roles


def write_placement(roles: Roles, run_dir: Path) -> None:
    """``roles.json`` in the run directory: each role's placement and process id (what an operator, or a test,
    signals or watches), written again whenever a role restarts."""

    def write() -> None:
        (run_dir / "roles.json").write_text(json.dumps(roles.describe(), indent=2) + "\n", encoding="utf-8")

    for role in roles.all():
        actor = role.role if isinstance(role, RelayedRole) else role
        if isinstance(actor, RayRole):
            actor.on_restart = write
    write()
