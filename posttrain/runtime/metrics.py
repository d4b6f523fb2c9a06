"""A step's statistics (:class:`Metrics`, each of a declared kind), written to ``metrics.jsonl`` (one JSON object a
line, always) and TensorBoard (optional), and the progress bar."""

from __future__ import annotations

import enum
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class Kind(enum.Enum):
    """How a statistic combines over the micro-batches of a step and over processes, and what is logged."""

    SUM = "sum"
    """The total, summed."""
    TOKEN_MEAN = "token mean"
    """Σ total / Σ tokens: a mean per trained token (a loss normalised by tokens)."""
    EXAMPLE_MEAN = "example mean"
    """Σ total / Σ count: a mean per example (pair, response, prompt; a process, with count 1 each)."""
    STD = "std"
    """The standard deviation of values, from Σx, Σx² and their count (the population formula)."""
    PER_SECOND = "per second"
    """The total divided by the step's wall-clock seconds (throughput)."""
    LAST = "last"
    """The value as last given: not summed over micro-batches or processes, so it must already be the same on
    every process (logged from the main one)."""


MEAN_KINDS = (Kind.TOKEN_MEAN, Kind.EXAMPLE_MEAN)


class Metrics:
    """One step's statistics: each name has a kind (:class:`Kind`) and the numbers that kind sums (a total, a
    total and its count, Σx/Σx²/count). Recipes fill one per micro-batch with the totals of that micro-batch, never
    pre-divided; the runtime merges the micro-batches, sums every process's numbers with one all-reduce
    (:meth:`reduce`) and logs :meth:`values`. A mean whose count is 0 over the whole step is left out.

    Every process must record the same names and kinds (in any order): the all-reduce lines them up by name.
    ``trained_tokens`` (:meth:`count_trained_tokens`) is summed alike and becomes the run's ``tokens_trained``."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Kind, list[float]]] = {}
        self.trained_tokens = 0.0
        self._counts_tokens = False  # whether trained tokens were counted (even 0): the same on every process

    # -------------------------------------------------------------------------------------------- recording
    def sum(self, name: str, value: Any) -> None:
        self._add(name, Kind.SUM, [value])

    def token_mean(self, name: str, total: Any, tokens: Any) -> None:
        self._add(name, Kind.TOKEN_MEAN, [total, tokens])

    def example_mean(self, name: str, total: Any, count: Any) -> None:
        self._add(name, Kind.EXAMPLE_MEAN, [total, count])

    def std(self, name: str, values: torch.Tensor) -> None:
        values = values.detach().double()
        self._add(name, Kind.STD, [values.sum(), (values**2).sum(), values.numel()])

    def per_second(self, name: str, value: Any) -> None:
        self._add(name, Kind.PER_SECOND, [value])

    def last(self, name: str, value: Any) -> None:
        self._add(name, Kind.LAST, [value])

    def count_trained_tokens(self, tokens: Any) -> None:
        """Tokens the loss trained on (summed into the run summary's ``tokens_trained``; not logged per step)."""
        self.trained_tokens += float(tokens)
        self._counts_tokens = True

    def _add(self, name: str, kind: Kind, numbers: list[Any]) -> None:
        plain = [float(number) for number in numbers]  # tensors: detached to Python floats once, here
        if name not in self._entries:
            self._entries[name] = (kind, plain)
            return
        known, sums = self._entries[name]
        if known is not kind:
            raise ValueError(
                f"metric {name!r} is recorded both as {kind.value} and as {known.value}; one name, one kind"
            )
        self._entries[name] = (kind, plain if kind is Kind.LAST else [a + b for a, b in zip(sums, plain)])

    # -------------------------------------------------------------------------------------------- combining
    def merge(self, other: Metrics) -> Metrics:
        """Adds ``other``'s numbers to these (another micro-batch, or another process's share); returns self."""
        for name, (kind, numbers) in other._entries.items():
            self._add(name, kind, numbers)
        self.trained_tokens += other.trained_tokens
        self._counts_tokens |= other._counts_tokens
        return self

    def reduce(
        self, sum_over_processes: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str = "cpu"
    ) -> Metrics:
        """These statistics summed over every process: all summed numbers in one float64 tensor through
        ``sum_over_processes`` (an all-reduce), ``LAST`` values kept as they are."""
        summed = sorted(name for name, (kind, _) in self._entries.items() if kind is not Kind.LAST)
        flat = [number for name in summed for number in self._entries[name][1]] + [self.trained_tokens]
        totals = sum_over_processes(torch.tensor(flat, dtype=torch.float64, device=device)).tolist()
        reduced = Metrics()
        reduced._entries = dict(self._entries)
        position = 0
        for name in summed:
            kind, numbers = self._entries[name]
            reduced._entries[name] = (kind, totals[position : position + len(numbers)])
            position += len(numbers)
        reduced.trained_tokens, reduced._counts_tokens = totals[position], self._counts_tokens
        return reduced

    # -------------------------------------------------------------------------------------------- reading
    def values(self, seconds: float | None = None) -> dict[str, float]:
        """What is logged, by name, in recording order; ``PER_SECOND`` entries only when ``seconds`` is given."""
        out: dict[str, float] = {}
        for name, (kind, numbers) in self._entries.items():
            if kind in (Kind.SUM, Kind.LAST):
                out[name] = numbers[0]
            elif kind in MEAN_KINDS:
                if numbers[1]:
                    out[name] = numbers[0] / numbers[1]
            elif kind is Kind.STD:
                total, total_sq, count = numbers
                if count:
                    out[name] = math.sqrt(max(total_sq / count - (total / count) ** 2, 0.0))
            elif seconds is not None:  # Kind.PER_SECOND
                out[name] = numbers[0] / seconds
        return out

    def __bool__(self) -> bool:
        """Whether anything was recorded (the same answer on every process, so all skip an empty reduce alike)."""
        return bool(self._entries) or self._counts_tokens


class MetricsWriter:
    """Appends metric records; on resume the file is cut back to the checkpoint's step so no step appears twice."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._tensorboard = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines()
            if json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than crash
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class Durations:
    """Seconds of a repeated event (steps, evaluations, checkpoints), each kept for the summary, with their running
    sum, so the ETA's means cost nothing per step however long the run."""

    seconds: list[float] = field(default_factory=list)
    total: float = 0.0

    def add(self, seconds: float) -> None:
        self.seconds.append(seconds)
        self.total += seconds

    def mean(self, skip_first: bool = False) -> float:
        """The mean (0 before any); ``skip_first``: without the first (a warm-up) once there are others."""
        if skip_first and len(self.seconds) > 1:
            return (self.total - self.seconds[0]) / (len(self.seconds) - 1)
        return self.total / len(self.seconds) if self.seconds else 0.0


def events_after(done_steps: int, total_steps: int, every: int | None) -> int:
    """Evaluations or checkpoints a run makes after ``done_steps``: every ``every`` steps, and at its last step."""
    if done_steps >= total_steps:
        return 0
    periodic = total_steps // every - done_steps // every if every else 0
    return periodic + (0 if every and total_steps % every == 0 else 1)


def remaining_seconds(
    done_steps: int,
    total_steps: int,
    step_s: float,
    eval_every: int | None,
    eval_s: float,
    checkpoint_every: int | None,
    checkpoint_s: float,
) -> float:
    """Seconds the steps after ``done_steps`` will take with the evaluations and checkpoints among them: the
    progress line's ETA, and ``posttrain estimate --time`` (``posttrain.probe``) from a sample of the steps."""
    return (
        (total_steps - done_steps) * step_s
        + events_after(done_steps, total_steps, eval_every) * eval_s
        + events_after(done_steps, total_steps, checkpoint_every) * checkpoint_s
    )


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """tqdm bar over optimizer steps with loss, tokens/s and the ETA: :func:`remaining_seconds` from the mean
    step (after the first), evaluation and checkpoint times, as ``posttrain estimate --time`` predicts a run
    (tqdm's own rate would count evaluations and checkpoints as slow steps)."""

    def __init__(self, total: int, initial: int, enabled: bool, description: str) -> None:
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=description,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
            )

    def update(self, values: dict[str, float | str]) -> None:
        if self._bar is None:
            return
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in values.items()}
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(1)

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
