"""Where a role runs: in the training process (:class:`LocalRole`) or in a Ray actor (:class:`RayRole`), behind
one call interface, ``role.submit(method, *args) -> Pending`` and ``pending.result()``.

What a Ray call can do, and what the run does about it (the anchors' users suffer most from syncs and calls that
hang: TRL #6796/#6797, OpenRLHF #265):

- every call waits at most its timeout (``distributed.call_timeout_s``, ``sync_timeout_s`` for weight syncs),
  then the run fails with one line naming the role and the call;
- a dead actor (killed, out of memory, its node gone) fails the run at once, naming the role, or with
  ``distributed.restarts`` left, a new actor is built from the config, given the last weight sync again, and the
  call is repeated: the samples are keyed by (seed, step, prompt, sample), so the repeat draws the same ones;
- an exception inside the role is raised again here as itself (a stale engine's ``StaleWeights``, a reward
  function's error), not as a Ray wrapper.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from posttrain.config import DistributedBlock, PpoConfig
from posttrain.data.records import Prompt
from posttrain.roles.workers import build_role


class RoleFailed(RuntimeError):
    """A role died or did not answer in time: the run stops, naming it."""


class Pending:
    """A call's result, ready (local) or to wait for (Ray)."""

    def __init__(self, value: Any = None, fetch: Any = None) -> None:
        self._value, self._fetch = value, fetch

    def result(self) -> Any:
        return self._fetch() if self._fetch is not None else self._value


class LocalRole:
    """A role in the training process: calls run at once."""

    def __init__(self, name: str, instance: Any) -> None:
        self.name, self.instance = name, instance

    def submit(self, method: str, *args: Any, timeout_s: float | None = None) -> Pending:
        return Pending(getattr(self.instance, method)(*args))

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        pass


class RoleHost:
    """The Ray actor class every role lives in: it builds the role from the config (``workers.build_role``), with
    its torch thread count, and runs the methods it is sent."""

    def __init__(self, kind: str, config: PpoConfig, every_prompt: list[Prompt], threads: int) -> None:
        torch.set_num_threads(threads)
        self.role = build_role(kind, config, every_prompt)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.role, method)(*args)

    def pid(self) -> int:
        return os.getpid()


class RayRole:
    """A role in its own Ray actor. ``replayed`` methods (a weight sync) are remembered, last call only, and sent
    again to a restarted actor before the failed call is repeated."""

    replayed = ("load_weights",)

    def __init__(
        self,
        name: str,
        kind: str,
        config: PpoConfig,
        every_prompt: list[Prompt],
        resources: dict[str, float],
        threads: int,
        timeout_s: float,
        restarts: int,
    ) -> None:
        self.name, self.timeout_s, self.restarts_left = name, timeout_s, restarts
        self._arguments = (kind, config, every_prompt, threads)
        self._resources = resources
        self._replay: dict[str, tuple[Any, ...]] = {}
        self.restarted = 0
        self.on_restart: Any = None  # called after a restart (roles.json follows the new process)
        self._start()

    def _start(self) -> None:
        import ray

        host: Any = ray.remote(RoleHost)
        self.actor: Any = host.options(max_restarts=0, max_task_retries=0, **self._resources).remote(*self._arguments)
        self._pid = self._get(self.actor.pid.remote(), "start", self.timeout_s)

    def pid(self) -> int:
        return int(self._pid)

    def submit(self, method: str, *args: Any, timeout_s: float | None = None) -> Pending:
        import ray

        if method in self.replayed:
            # One copy in the object store for every engine and for a replay after a restart.
            args = tuple(ray.put(a) if not isinstance(a, (int, float, str)) else a for a in args)
            self._replay[method] = args
        reference = self.actor.call.remote(method, *args)
        wait = timeout_s or self.timeout_s
        return Pending(fetch=lambda: self._result(reference, method, args, wait))

    def _result(self, reference: Any, method: str, args: tuple[Any, ...], timeout_s: float) -> Any:
        while True:
            try:
                return self._get(reference, method, timeout_s)
            except RoleFailed as failure:
                if self.restarts_left <= 0:
                    raise
                self.restarts_left -= 1
                self.restarted += 1
                print(
                    f"ray: {failure}; restarting it from the last weight sync ({self.restarts_left} restart(s) left)",
                    file=sys.stderr,
                    flush=True,
                )
                replayed = self._restart()
                if method in replayed:  # the failed call was the last sync itself: the replay made it
                    return replayed[method]
                reference = self.actor.call.remote(method, *args)

    def _restart(self) -> dict[str, Any]:
        """A new actor, given the remembered calls again; their answers by method."""
        import ray

        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # already gone: that is why it restarts
            pass
        self._start()
        if self.on_restart is not None:
            self.on_restart()
        return {
            method: self._get(self.actor.call.remote(method, *args), method, self.timeout_s)
            for method, args in self._replay.items()
        }

    def _get(self, reference: Any, method: str, timeout_s: float) -> Any:
        import ray
        import ray.exceptions as errors

        try:
            return ray.get(reference, timeout=timeout_s)
        except errors.GetTimeoutError:
            raise RoleFailed(
                f"role {self.name} did not answer {method} within {timeout_s:g} s (distributed.call_timeout_s / "
                "sync_timeout_s)"
            ) from None
        except errors.RayTaskError as error:
            cause = error.cause if isinstance(error.cause, BaseException) else None
            if cause is not None:
                raise cause from None
            raise RoleFailed(f"role {self.name} failed in {method}: {error}") from None
        except errors.RayActorError as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise RoleFailed(f"role {self.name} (Ray actor) died during {method}: {reason}") from None

    def close(self) -> None:
        import ray

        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:
            pass


class TrainerGroup:
    """The policy trainer's processes (a torch.distributed group of several): only the main one talks to Ray; the
    others reach the roles through it (:class:`RelayedRole`)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0

    def gather(self, value: Any) -> list[Any] | None:
        import torch.distributed as dist

        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def scatter(self, values: list[Any] | None) -> Any:
        import torch.distributed as dist

        mine: list[Any] = [None]
        dist.scatter_object_list(mine, values if self.is_main else None, src=0)
        return mine[0]

    def broadcast(self, value: Any) -> Any:
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


class RelayedRole:
    """A Ray-placed role as every process of a trainer group sees it. Each call is collective: every process's
    arguments are gathered on the main process, which sends one call per process to the role, then scatters
    each process its answer, or the error (every process then raises it: none is left waiting). Calls that only
    the main process has something for (a weight sync) go through :meth:`submit_from_main`."""

    def __init__(self, name: str, role: RayRole | None, group: TrainerGroup) -> None:
        self.name, self.role, self.group = name, role, group

    def submit(self, method: str, *args: Any, timeout_s: float | None = None) -> Pending:
        requests = self.group.gather(args)
        calls: list[Pending] = []
        if self.role is not None and requests is not None:
            calls = [self.role.submit(method, *request, timeout_s=timeout_s) for request in requests]

        def fetch() -> Any:
            answers: list[Any] | None = None
            if self.group.is_main:
                try:
                    answers = [call.result() for call in calls]
                except Exception as error:  # every process raises it, so none waits forever
                    answers = [error] * self.group.world_size
            mine = self.group.scatter(answers)
            if isinstance(mine, BaseException):
                raise mine
            return mine

        return Pending(fetch=fetch)

    def submit_from_main(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        """The main process's call alone (the others pass nothing); its answer, or its error, on every process."""
        answer: Any = None
        if self.role is not None:
            try:
                answer = self.role.submit(method, *args, timeout_s=timeout_s).result()
            except Exception as error:
                answer = error
        answer = self.group.broadcast(answer)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    @property
    def restarted(self) -> int:
        return self.role.restarted if self.role is not None else 0

    def pid(self) -> int:
        return self.role.pid() if self.role is not None else -1

    def close(self) -> None:
        if self.role is not None:
            self.role.close()


# ------------------------------------------------------------------------------------------------- the Ray runtime
@contextmanager
def ray_runtime(distributed: DistributedBlock, run_dir: Path, num_cpus: float, log: Any) -> Iterator[None]:
    """Ray for the run's roles. Already initialised in this process (a test, a notebook, a driver of its own):
    used as it is. ``distributed.ray_address``: that cluster is joined. Otherwise a local Ray: on 127.0.0.1, no
    dashboard, at least ``num_cpus`` CPUs (what the actors reserve; on a small machine more than it has, since the
    roles mostly wait on each other), its temporary files and the HOME of its processes inside the run directory.

    Ray's sockets live in its temporary directory and a Unix socket path has at most 107 bytes: when the run
    directory is too deep for that, the files go to a short directory under the system's temp dir, linked from
    ``run_dir/ray`` and said in the log. Ray is shut down at the end only if this run started it."""
    try:
        import ray
    except ImportError as error:  # pragma: no cover - the dev extra installs it
        raise RoleFailed("distributed.placement=ray needs Ray: pip install 'posttrain[ray]'") from error
    if ray.is_initialized():
        log("ray: using the Ray runtime already running in this process")
        yield
        return
    if distributed.ray_address:
        ray.init(address=distributed.ray_address, log_to_driver=True, configure_logging=False)
        log(f"ray: joined the cluster at {distributed.ray_address}")
        try:
            yield
        finally:
            ray.shutdown()
        return
    temp_dir = run_dir.resolve() / "ray"
    if len(str(temp_dir)) > 40:
        short = Path(tempfile.mkdtemp(prefix="ptray-"))
        if temp_dir.is_symlink():  # a resumed run's link to its first session's files
            temp_dir.unlink()
        temp_dir.symlink_to(short, target_is_directory=True)
        log(
            f"ray: temporary files in {short} (linked from {temp_dir}; the run directory is too deep for Ray's sockets)"
        )
        temp_dir = short
    home = run_dir.resolve() / "ray-home"
    home.mkdir(parents=True, exist_ok=True)
    previous_home = os.environ.get("HOME")
    os.environ["HOME"] = str(home)  # inherited by the raylet and every worker it starts
    started = time.time()
    try:
        ray.init(
            num_cpus=max(int(num_cpus + 0.999), os.cpu_count() or 1),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=str(temp_dir),
            log_to_driver=True,
            configure_logging=False,
        )
    finally:
        if previous_home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = previous_home
    log(f"ray: local runtime on 127.0.0.1 started in {time.time() - started:.1f} s")
    try:
        yield
    finally:
        ray.shutdown()
