"""``posttrain train CONFIG --nproc N [--nnodes M --node-rank R --master-addr A --master-port P]``: start the
training processes of this machine through torch's elastic launcher (what ``torchrun`` runs), each executing
``python -m posttrain train CONFIG ...`` as one rank of the group.

The launcher, not the user, knows the world size it asked for; it passes it on as
``POSTTRAIN_EXPECTED_WORLD_SIZE``, and every process refuses to train in a group of another size
(``runtime.distributed.check_world_size``). A process that dies (an error, SIGKILL) ends the whole job: torch's
agent stops the other processes and the launch fails, naming the rank, instead of leaving them waiting in a
collective.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

EXPECTED_WORLD_SIZE = "POSTTRAIN_EXPECTED_WORLD_SIZE"


class LaunchError(ValueError):
    """Launcher flags that cannot form a group; the message says which."""


@dataclass(frozen=True)
class Launch:
    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    @property
    def needed(self) -> bool:
        """Whether the launcher starts processes at all: one process on one machine runs in this process."""
        return self.world_size > 1

    def check(self) -> None:
        if self.nproc < 1 or self.nnodes < 1:
            raise LaunchError(f"--nproc and --nnodes must be at least 1 (got {self.nproc} and {self.nnodes})")
        if not 0 <= self.node_rank < self.nnodes:
            raise LaunchError(f"--node-rank {self.node_rank} is not in 0..{self.nnodes - 1} (--nnodes {self.nnodes})")
        if self.nnodes > 1 and not self.master_addr:
            raise LaunchError(
                f"--nnodes {self.nnodes}: every machine needs --master-addr (the address of the node with "
                "--node-rank 0) and the same --master-port"
            )
        if "LOCAL_RANK" in os.environ:
            raise LaunchError(
                "--nproc/--nnodes inside a process that a launcher already started (LOCAL_RANK is set): give them to "
                "one launcher only, this one or torchrun/deepspeed"
            )

    def torchrun_arguments(self, train_arguments: list[str]) -> list[str]:
        """torchrun's command line for ``posttrain train`` with ``train_arguments``."""
        arguments = ["--nproc-per-node", str(self.nproc), "--nnodes", str(self.nnodes), "--max-restarts", "0"]
        if self.nnodes == 1 and self.master_addr is None:
            arguments.append("--standalone")  # a free loopback port, chosen by the launcher
        else:
            arguments += ["--node-rank", str(self.node_rank), "--master-addr", self.master_addr or "127.0.0.1"]
            arguments += ["--master-port", str(self.master_port or 29500)]
        return [*arguments, "-m", "posttrain", "train", *train_arguments]


def launch(spec: Launch, train_arguments: list[str]) -> int:
    """Run ``posttrain train train_arguments`` as ``spec.nproc`` processes of this machine; returns the exit code
    (non-zero when any process failed)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    spec.check()
    os.environ[EXPECTED_WORLD_SIZE] = str(spec.world_size)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default: N processes must not oversubscribe
    arguments = get_args_parser().parse_args(spec.torchrun_arguments(train_arguments))
    try:
        run(arguments)
    except ChildFailedError as failure:
        rank, first = failure.get_first_failure()
        print(
            f"posttrain: process {rank} of {spec.world_size} failed (exit code {first.exitcode}); the job stopped. "
            f"Its error is above; resume with the same command (resume=auto continues the last checkpoint).",
            file=sys.stderr,
        )
        return 1
    return 0
