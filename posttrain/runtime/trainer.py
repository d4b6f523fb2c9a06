"""The training runtime every recipe shares: device and precision, the batch stream, the optimizer step with
token-normalised gradient accumulation, clipping, NaN guard, evaluation and early stopping, atomic checkpoints,
resume, signals, metrics, and the end-of-run artefacts.

A recipe reads like this (``recipes/sft.py``)::

    rt = Runtime(config)
    model, tokenizer = load_model(config.model, config.peft)
    examples = ...                                    # items with a ``num_targets`` count
    model = rt.setup(model, num_rows=len(examples))   # optimizer, scheduler, resume
    for batch in rt.batches(examples, collate):       # the exact data position survives a resume
        loss, loss_stats = losses.sft_loss(token_logits(model, batch), ..., batch["num_items_in_batch"])
        stats = Metrics()                             # typed: a token mean, example means, sums (metrics.Kind)
        stats.token_mean("loss", loss_stats["loss_sum"], loss_stats["num_tokens"])
        rt.step(loss, stats)                          # backward; on the last micro-batch: clip, step, log
        if held_out and rt.should_evaluate():         # every train.eval_every steps, and after the last
            rt.record_evaluation(evaluate(model, held_out))   # best checkpoint, early stopping
    rt.finish(model, tokenizer)                       # the final model, checkpoint, report

Batch size counts examples. Every optimizer step consumes one *group* of ``batch_size x grad_accum x processes``
examples (data rows: SFT or pretraining sequences, preference pairs, KTO examples) of a seeded per-epoch
permutation (an incomplete last group is dropped, as every process must step together); each micro-batch is
``batch_size`` of them, which the recipe's ``collate`` lays out in tensors (packed or padded: the layout is the
collate's business, so packing never changes which examples a step trains on). The data position is therefore a
function of the step count, which is what makes resume exact. ``num_items_in_batch`` is the summed weight
(trained tokens, or examples) of the whole group, computed from the examples on every process without
communication, so accumulated micro-batches normalise exactly as one large batch would. Every step logs its
example count as ``examples``.

A step ends in three moves: :meth:`log_step` (inside :meth:`step` on the last micro-batch) logs it; the recipe
evaluates when :meth:`should_evaluate` says so and hands the results to :meth:`record_evaluation`; :meth:`end_step`
(called by :meth:`batches` and :meth:`iterations` when the loop comes back for the next step) writes the periodic
checkpoint and honours a pending signal. A checkpoint therefore always holds its own step's evaluation.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.config import ConfigError, StageConfig, save_config
from posttrain.data.preflight import preflight
from posttrain.models.adapters import count_parameters
from posttrain.models.forward import reference_logps
from posttrain.runtime import checkpoint as ckpt
from posttrain.runtime.distributed import STRATEGIES, check_world_size, release_local_rank
from posttrain.runtime.memory import MemoryWatch
from posttrain.runtime.metrics import (
    Durations,
    Metrics,
    MetricsWriter,
    Progress,
    format_duration,
    read_metrics,
    remaining_seconds,
)
from posttrain.runtime.optim import build_optimizer, build_scheduler
from posttrain.runtime.report import write_plots, write_report


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient."""


class TrainingInterrupted(SystemExit):
    """SIGTERM/SIGINT: a checkpoint was written; the message says how to resume."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(128 + signum)
        self.message = message


def _forget_previous_accelerator_settings() -> None:
    """accelerate keeps its settings in process-wide singletons, so a second run in the same process (a pipeline
    of stages, a notebook, tests) with another precision would be refused. The process-group part stays: it is
    the same for every run of this process."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


@dataclass(frozen=True)
class ModelSelection:
    """The held-out metric a stage picks its best checkpoint by, which early stopping follows, and its direction.
    Each recipe names its own (``eval_loss``, minimised, unless it says otherwise): an online-RL stage has no
    held-out loss, only held-out rewards to maximise."""

    metric: str = "eval_loss"
    maximize: bool = False

    def better(self, value: float, best: float) -> bool:
        return value > best if self.maximize else value < best

    @property
    def worst(self) -> float:
        return -math.inf if self.maximize else math.inf


class Runtime:
    """Owns the mechanics of one training run; recipes own only their algorithm."""

    def __init__(self, config: StageConfig, config_path: str | None = None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config = config
        self.config_path = config_path
        self.train = config.train
        if config.train.precision == "fp16" and not torch.cuda.is_available():
            raise ValueError("train.precision=fp16 uses loss scaling and needs a CUDA GPU; use bf16 on CPU")
        precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[config.train.precision]
        _forget_previous_accelerator_settings()
        release_local_rank()  # a previous one-process DeepSpeed run in this process that ended in an error
        # cpu=True without CUDA: accelerate then forms a gloo process group under torchrun (DDP on CPU).
        self.accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
        check_world_size(self.accelerator.num_processes)
        self.strategy = STRATEGIES[config.distributed.strategy](config, self.accelerator)
        set_seed(config.seed)
        self.run_dir = Path(config.output_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.is_main = self.accelerator.is_main_process
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.run_dir / "config.yaml")
        self.metrics = MetricsWriter(self.run_dir, config.logging.tensorboard, enabled=self.is_main)
        if self.world_size > 1:  # every process says who it is: a launch that formed no group shows at once
            print(
                f"process {self.accelerator.process_index} of {self.world_size} ({config.distributed.strategy}, "
                f"local rank {self.accelerator.local_process_index}, device {self.device})",
                file=sys.stderr,
            )
        self.global_step = 0
        self.total_steps = 0
        self.steps_per_epoch = 0
        self.model: Any = None
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.trainable = (0, 0)
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.selection = ModelSelection()
        self.best_eval = self.selection.worst  # the best value of selection.metric so far
        self.best_step: int | None = None
        self.best_results: dict[str, float] | None = (
            None  # the whole evaluation at best_step: the restored model's figures
        )
        self.evals_without_improvement = 0
        self.stopped_early = False
        self.tokens_trained = 0
        self.started = time.time()
        self._signal: int | None = None
        self._micro = 0
        self._step_stats = Metrics()  # the current step's statistics on this process (micro-batches merged)
        self._group_losses: list[torch.Tensor] = []
        self._step_started = 0.0
        # Seconds spent in steps (the first apart: warm-up), evaluations and checkpoints: the ETA and the summary.
        self.step_times, self.eval_times, self.checkpoint_times = Durations(), Durations(), Durations()
        self._eval_started: float | None = None
        self._progress: Progress | None = None
        self.resumed_from: Path | None = None
        self.last_eval: tuple[int, dict[str, float]] | None = None  # (step, results) of the latest evaluation
        self._step_open = False  # a step was logged and its end (end_step: checkpoint, signals) is still to come
        self._saved_step: int | None = None  # the step whose best checkpoint its evaluation wrote
        self._rows_per_step: int | None = None
        self._step_examples: int | None = None  # examples of the current step (all processes), logged as "examples"
        self._update_norms: list[float] = []
        self._update_group_norms: list[dict[str, float]] = []  # per parameter group, when there are several
        self._skipped_updates = 0
        self.recipe_state: dict[str, Any] = {}
        """A recipe's own JSON-serialisable state (an RL run's KL coefficient, reward statistics, watch history):
        written with every checkpoint and restored on resume, so a resumed run continues exactly."""
        # The plan before any weight is read: printed, checked against the device, then against the measured peak.
        self.memory = MemoryWatch(config, self.world_size, self.device)
        self.log(self.memory.describe())
        self.memory.refuse_if_it_cannot_fit()

    # ------------------------------------------------------------------------------------------------ set-up
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def rows_per_step(self) -> int:
        """Examples (data rows) one step consumes over all processes: ``batch_size x grad_accum x processes``, or
        what a step-structured recipe set (online RL: prompts per step)."""
        return self._rows_per_step or self.train.batch_size * self.train.grad_accum * self.world_size

    def log(self, message: str) -> None:
        if not self.is_main:
            return
        if self._progress is not None:
            self._progress.write(message)
        else:
            print(message, file=sys.stderr)

    def check_data(self, sequences: Any, tokenizer: Any) -> None:
        """Log the data reports and the preflight, and refuse (``DataError``) a run that cannot work."""

        for report in sequences.reports:
            self.log(f"data: {report}")
        checks = preflight(sequences, tokenizer, self.config.data, self.config.stage)
        self.log(checks.text())
        checks.raise_if_failed()

    def eval_batches(
        self, rows: Sequence[Any], collate: Callable[[list[Any]], dict[str, Any]]
    ) -> Iterator[dict[str, Any]]:
        """This process's share of held-out ``rows`` (examples) in batches of ``train.batch_size`` examples, laid
        out by ``collate``, on the device; combine per-process results with :meth:`sum_over_processes`.

        Processes may get one batch more or less than each other, so a sharded model is gathered whole while the
        batches are consumed (:meth:`full_weights`): its forwards then need no collective."""
        mine = rows[self.accelerator.process_index :: self.world_size]
        with self.full_weights(self.model) if self.model is not None else nullcontext():
            for start in range(0, len(mine), self.train.batch_size):
                yield {
                    k: v.to(self.device) if hasattr(v, "to") else v
                    for k, v in collate(list(mine[start : start + self.train.batch_size])).items()
                }

    def reference_tables(
        self,
        model: Any,
        collate: Callable[[list[Any]], dict[str, Any]],
        train: tuple[Sequence[Any], int],
        held_out: tuple[Sequence[Any], int],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen reference's summed log-probs of every sequence of the training and held-out examples, each
        given as ``(examples, number of sequences)``: computed once, before :meth:`setup` restores a checkpoint
        (``models.forward.reference_logps`` says why), so training holds one model. No held-out examples: None."""
        (train_rows, train_sequences), (held_out_rows, held_out_sequences) = train, held_out
        self.log(f"reference log-probs: {train_sequences + held_out_sequences} sequences, computed once")
        train_table = reference_logps(model, self.eval_batches(train_rows, collate), train_sequences, self.accelerator)
        if not held_out_rows:
            return train_table, None
        held_out_batches = self.eval_batches(held_out_rows, collate)
        return train_table, reference_logps(model, held_out_batches, held_out_sequences, self.accelerator)

    def sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum") if self.world_size > 1 else tensor

    def setup(
        self,
        model: Any,
        num_rows: int,
        rows_per_step: int | None = None,
        updates_per_step: int = 1,
        parameter_groups: list[dict[str, Any]] | Callable[[Any], list[dict[str, Any]]] | None = None,
        selection: ModelSelection = ModelSelection(),
    ) -> Any:
        """Optimizer, schedule and device placement for ``model``; restores a checkpoint when resuming.

        ``num_rows`` is the number of training examples (what :meth:`batches` iterates). Step-structured recipes
        (online RL, :meth:`iterations`) give ``rows_per_step`` (prompts consumed per step over all processes)
        and ``updates_per_step`` (optimizer updates per step, which the learning-rate
        schedule counts); ``parameter_groups`` (torch's ``[{"params": [...], "lr": ...}]``, or a function of the
        model that returns them: under FSDP the parameters only exist once the model is sharded) set per-group options
        such as a critic's learning rate (and ``name``/``max_grad_norm``, see :meth:`update`); ``selection`` is the
        held-out metric and direction that pick the best checkpoint and drive early stopping (the recipe evaluates:
        :meth:`should_evaluate`)."""

        self.selection = selection
        self.best_eval = selection.worst
        self._rows_per_step = rows_per_step
        self.steps_per_epoch = num_rows // self.rows_per_step
        if self.steps_per_epoch == 0:
            needs = (
                f"algorithm.prompts_per_step = {self.rows_per_step}"
                if rows_per_step
                else f"train.batch_size x train.grad_accum x processes = {self.train.batch_size} x {self.train.grad_accum} "
                f"x {self.world_size} = {self.rows_per_step}"
            )
            raise ConfigError(
                f"{num_rows} training examples are fewer than one optimizer step needs ({needs}); lower them or add data"
            )
        self.total_steps = self.train.max_steps or max(1, math.ceil(self.train.epochs * self.steps_per_epoch))
        self.trainable = count_parameters(model)
        trainable, total = self.trainable
        self.log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.4f}%)")
        model = self.strategy.shard(model)  # before the optimizer: FSDP replaces the parameters with their shards
        groups = parameter_groups(model) if callable(parameter_groups) else parameter_groups
        optimizer = build_optimizer(groups or model.parameters(), self.config.optim)
        self.scheduler = build_scheduler(optimizer, self.total_steps * updates_per_step, self.config.schedule)
        self.model, self.optimizer = self.strategy.prepare(model, optimizer)
        self.log(f"distributed: {self.strategy.describe(self.model)}")
        try:
            self._resume()
        except BaseException:  # a refused checkpoint: the run ends here, undo what the strategy set up
            self.strategy.close()
            raise
        self.memory.start(self.global_step)
        return self.model

    def unwrap(self, module: Any) -> Any:
        """The model inside what :meth:`setup` returned (DDP and DeepSpeed wrap it; FSDP shards it in place)."""
        return self.strategy.unwrap(module)

    def full_weights(self, module: Any) -> Any:
        """A context in which each process may run any number of forward passes on its own (generation,
        evaluation): a sharded model is gathered whole for its duration; a replicated one needs nothing."""
        return self.strategy.full_weights(module)

    def _checkpoint_to_resume(self) -> Path | None:
        resume = self.config.resume
        if resume is False:
            return None
        if resume == "auto":
            found = ckpt.list_checkpoints(self.checkpoint_dir)
            return found[-1] if found else None
        path = Path(resume)
        if not ckpt.is_complete(path):
            raise FileNotFoundError(
                f"resume={resume}: not a complete checkpoint directory (expected step-N/state.json)"
            )
        return path

    def _resume(self) -> None:
        path = self._checkpoint_to_resume()
        if path is None:
            self.metrics.truncate_after(0)
            return
        self.strategy.load(path, self.model, self.optimizer)
        state = ckpt.load_trainer_state(path, self.scheduler, self.accelerator.process_index, self._scaler)
        self.global_step = state["step"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.best_eval = state.get("best_eval", self.selection.worst)
        self.best_step = state.get("best_step")
        self.best_results = state.get("best_results")
        self.evals_without_improvement = state.get("evals_without_improvement", 0)
        self.tokens_trained = state.get("tokens_trained", 0)
        self.recipe_state = state.get("recipe", {})
        self.metrics.truncate_after(self.global_step)
        self.resumed_from = path
        self.log(f"resumed from {path} at step {self.global_step} (epoch {state['epoch']}, group {state['group']})")

    @property
    def _scaler(self) -> Any:
        return getattr(self.accelerator, "scaler", None)

    # ------------------------------------------------------------------------------------------------ the loop
    def _epoch_order(self, epoch: int, num_rows: int) -> list[int]:
        if not self.config.data.shuffle:
            return list(range(num_rows))
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        return torch.randperm(num_rows, generator=generator).tolist()

    def batches(
        self,
        rows: Sequence[Any],
        collate: Callable[[list[Any]], dict[str, Any]],
        weight: Callable[[Any], int] = lambda row: row.num_targets,
    ) -> Iterator[dict[str, Any]]:
        """Micro-batches of ``train.batch_size`` examples from ``rows``, from the current step to the last, each
        laid out by ``collate`` and carrying ``num_items_in_batch`` = the summed ``weight`` (trained tokens by
        default; 1 per example for per-example losses) of its whole accumulated group across all processes."""
        rank, world, micro = self.accelerator.process_index, self.world_size, self.train.batch_size
        for members in self._step_members(len(rows)):
            num_items = sum(weight(rows[i]) for i in members)
            self._step_started = time.time()
            self._step_examples = len(members)
            for m in range(self.train.grad_accum):
                first = (m * world + rank) * micro
                batch = collate([rows[i] for i in members[first : first + micro]])
                batch = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in batch.items()}
                batch["num_items_in_batch"] = max(num_items, 1)
                self.memory.saw_micro_batch(batch)
                last = m == self.train.grad_accum - 1
                # Gradients are all-reduced only on the last micro-batch of a group.
                with nullcontext() if last else self.strategy.no_sync(self.model):
                    yield batch
            self.end_step()

    def _step_members(self, num_rows: int) -> Iterator[list[int]]:
        """Row indices of each step's group, from the current step to the last; the progress bar and the
        signal handlers live as long as the loop."""
        self._install_signal_handlers()
        self._progress = Progress(
            self.total_steps, self.global_step, self.config.logging.progress and self.is_main, self.config.stage
        )
        order: list[int] = []
        order_epoch = -1
        try:
            while self.global_step < self.total_steps and not self.stopped_early:
                epoch, group = divmod(self.global_step, self.steps_per_epoch)
                if epoch != order_epoch:
                    order, order_epoch = self._epoch_order(epoch, num_rows), epoch
                start = group * self.rows_per_step
                yield order[start : start + self.rows_per_step]
        finally:
            self._progress.close()
            self._restore_signal_handlers()

    def rows_of_step(self, rows: Sequence[Any], step: int) -> list[Any] | None:
        """This process's share of step ``step``'s rows, what :meth:`iterations` yields at that step; None past the
        last step. Asynchronous RL samples the next step's prompts while this one trains."""
        if step >= self.total_steps:
            return None
        epoch, group = divmod(step, self.steps_per_epoch)
        members = self._epoch_order(epoch, len(rows))[group * self.rows_per_step : (group + 1) * self.rows_per_step]
        return [rows[i] for i in members[self.accelerator.process_index :: self.world_size]]

    def iterations(self, rows: Sequence[Any]) -> Iterator[list[Any]]:
        """For recipes whose step is more than one optimizer update (online RL: sample, score, then several
        updates): this process's share of each step's ``rows_per_step`` rows, from the current step to the last.
        The body calls :meth:`backward` per micro-batch, :meth:`update` per optimizer update, :meth:`log_step`
        once and then evaluates if :meth:`should_evaluate`; the data position is a function of the step count, as
        in :meth:`batches`."""
        rank, world = self.accelerator.process_index, self.world_size
        for members in self._step_members(len(rows)):
            self._step_started = time.time()
            yield [rows[i] for i in members[rank::world]]
            self.end_step()

    def step(self, loss: torch.Tensor, stats: Metrics | None = None) -> None:
        """Backward for one micro-batch; after the last one of a group: clip, guard, step, log (:meth:`log_step`).

        ``stats`` are the micro-batch's own totals (:class:`Metrics`), combined over the group's micro-batches and
        processes as their kinds say."""
        self.backward(loss)
        if stats is not None:
            self._step_stats.merge(stats)
        self._micro += 1
        if self._micro == self.train.grad_accum:
            self._micro = 0
            self.update()
            self.log_step()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward for one micro-batch."""
        # DDP averages gradients over processes; the loss is already normalised by the global token count.
        self.strategy.backward(loss * self.world_size)
        self._group_losses.append(loss.detach())

    def update(self) -> float:
        """One optimizer update from the accumulated gradients: clip, refuse a non-finite loss or gradient (the
        update is skipped and counted), step, schedule, zero; returns the gradient norm before clipping.

        Each optimizer parameter group is clipped on its own, to its ``max_grad_norm`` entry if it has one, else
        ``optim.max_grad_norm``: one model's gradients (a critic regressing unnormalised returns) then never
        scale another's step, as they would under one global clip (OpenRLHF clips actor and critic apart). With
        the one group most recipes have, this is the global clip. The returned norm is over every group."""
        loss_finite = all(torch.isfinite(loss).all() for loss in self._group_losses)
        group_norms, applied = self.strategy.step(self.optimizer, loss_finite)
        grad_norm = math.sqrt(sum(norm**2 for norm in group_norms.values()))
        if applied:
            self.scheduler.step()
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            self._skipped_updates += 1
        self._group_losses.clear()
        self._update_norms.append(grad_norm)
        if len(group_norms) > 1:
            self._update_group_norms.append(group_norms)
        return grad_norm

    def log_step(self, combined: Metrics | None = None) -> dict[str, Any]:
        """Log a finished step: its statistics (those given to :meth:`step`, all-reduced, plus ``combined``,
        statistics the recipe already reduced with :meth:`all_reduce`), the mean gradient norm of its updates, the
        learning rate; abort after too many non-finite steps. Returns the metrics record logged for the step."""
        stats = self.all_reduce(self._step_stats) if self._step_stats else self._step_stats
        stats.merge(combined or Metrics())
        norms = self._update_norms or [0.0]
        grad_norm, skipped = sum(norms) / len(norms), self._skipped_updates > 0
        # Each parameter group's norm before its clip, as grad_norm/NAME (mean over the step's updates).
        per_group = {
            f"grad_norm/{name}": sum(update[name] for update in self._update_group_norms)
            / len(self._update_group_norms)
            for name in (self._update_group_norms[0] if self._update_group_norms else {})
        }
        lr = self.scheduler.get_last_lr()[0]
        self.global_step += 1
        self.memory.step_done(self.global_step, self.model, self.optimizer)
        self._step_stats, self._update_norms, self._update_group_norms, self._skipped_updates = Metrics(), [], [], 0
        elapsed = max(time.time() - self._step_started, 1e-9)
        record: dict[str, Any] = {"lr": lr, "grad_norm": grad_norm, "epoch": self.global_step / self.steps_per_epoch}
        record.update(stats.values(seconds=elapsed))
        record.update(per_group)
        self.tokens_trained += int(stats.trained_tokens)
        if self._step_examples is not None:
            record["examples"] = self._step_examples
        record["step_time_s"] = elapsed
        self.step_times.add(elapsed)
        if skipped:
            record["skipped_nonfinite"] = self.nonfinite_total
            self.log(
                f"step {self.global_step}: non-finite loss or gradient (grad norm {grad_norm}); step skipped "
                f"({self.nonfinite_in_a_row} in a row, limit {self.train.max_nonfinite_steps})"
            )
        if self.global_step % self.train.log_every == 0 or skipped:
            self.metrics.log(self.global_step, record)
        if self._progress is not None:
            names = ("loss", "reward", "gold_reward", "kl", "tokens_per_s", "lr")
            shown: dict[str, float | str] = {
                "tok/s" if k == "tokens_per_s" else k: record[k] for k in names if k in record
            }
            self._progress.update({**shown, "eta": format_duration(self.seconds_left())})
        if self.nonfinite_in_a_row >= self.train.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} optimizer steps in a row had a NaN/inf loss or gradient (step {self.global_step}). "
                "Usual causes: learning rate too high (optim.lr), fp16 overflow (use bf16), a row with no trained "
                "token, or corrupt weights. The last good checkpoint is in "
                f"{self.checkpoint_dir} and was not overwritten."
            )
        self._step_open = True
        return record

    def mean_times(self) -> tuple[float, float, float]:
        """Mean seconds of a step (the first, a warm-up, left out once there are others), an evaluation and a
        checkpoint so far (0 for those not seen yet)."""
        return self.step_times.mean(skip_first=True), self.eval_times.mean(), self.checkpoint_times.mean()

    def seconds_left(self) -> float:
        step_s, eval_s, checkpoint_s = self.mean_times()
        return remaining_seconds(
            self.global_step,
            self.total_steps,
            step_s,
            self.train.eval_every,
            eval_s,
            self.config.checkpoint.every,
            checkpoint_s,
        )

    def all_reduce(self, stats: Metrics) -> Metrics:
        """``stats`` summed over every process with one all-reduce, as their kinds say (as they are on one)."""
        return stats.reduce(self.sum_over_processes, self.device) if self.world_size > 1 else stats

    def end_step(self) -> None:
        """The end of a logged step, after the recipe's evaluation: the periodic checkpoint (unless the
        evaluation just wrote this step's, the best), then a pending signal. :meth:`batches` and
        :meth:`iterations` call it when the loop comes back for the next step (or ends)."""
        if not self._step_open:
            return
        self._step_open = False
        every = self.config.checkpoint.every
        if self._saved_step != self.global_step and every and self.global_step % every == 0:
            self.save_checkpoint()
        if self._signal is not None:
            self._interrupt()

    # ------------------------------------------------------------------------------------------------ evaluation
    def should_evaluate(self) -> bool:
        """Whether the recipe should evaluate now (then :meth:`record_evaluation`): right after a logged step,
        every ``train.eval_every`` steps and after the run's last step (early stopping included); without
        ``eval_every``, once after the last step, for the summary's figures of the final model."""
        if not self._step_open or (self.last_eval is not None and self.last_eval[0] == self.global_step):
            return False
        every = self.train.eval_every
        last = self.global_step >= self.total_steps or self.stopped_early
        evaluate = last or bool(every and self.global_step % every == 0)
        if evaluate:
            self._eval_started = time.time()
        return evaluate

    def record_evaluation(self, results: dict[str, float]) -> None:
        """Take the recipe's held-out ``results`` for the current step: log them, track the best by the stage's
        :class:`ModelSelection` (its checkpoint is written now, so it exists to be kept), early-stop. Without
        ``train.eval_every`` they are only the final model's figures for the summary."""
        self.last_eval = (self.global_step, results)
        if self._eval_started is not None:
            self.eval_times.add(time.time() - self._eval_started)
            self._eval_started = None
        if not self.train.eval_every:
            return
        self.metrics.log(self.global_step, results)
        metric = self.selection.metric
        if metric not in results:
            # A missing metric used to count as "no improvement", so early stopping ended runs for nothing.
            raise ValueError(
                f"the {self.config.stage} stage selects models by {metric}, which its evaluation did not return "
                f"(it returned {', '.join(sorted(results)) or 'nothing'})"
            )
        value = results[metric]
        self.log(f"step {self.global_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
        if self.selection.better(value, self.best_eval):
            self.best_eval, self.best_step, self.best_results = value, self.global_step, results
            self.evals_without_improvement = 0
            self.save_checkpoint()  # the best checkpoint must exist to be kept
            self._saved_step = self.global_step
            return
        self.evals_without_improvement += 1
        patience = self.train.early_stopping_patience
        if patience and self.evals_without_improvement >= patience:
            self.stopped_early = True
            self.log(
                f"early stopping at step {self.global_step}: no validation improvement in {patience} evaluations; "
                f"best {metric} {self.best_eval:.4f} at step {self.best_step}"
            )

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        epoch, group = divmod(self.global_step, self.steps_per_epoch)
        return {
            "step": self.global_step,
            "epoch": epoch,
            "group": group,
            "total_steps": self.total_steps,
            "nonfinite_total": self.nonfinite_total,
            "best_step": self.best_step,
            "evals_without_improvement": self.evals_without_improvement,
            "tokens_trained": self.tokens_trained,
            "strategy": self.config.distributed.strategy,
            "world_size": self.world_size,
            **({"recipe": self.recipe_state} if self.recipe_state else {}),
            **({"best_eval": self.best_eval} if math.isfinite(self.best_eval) else {}),
            **({"best_results": self.best_results} if self.best_results is not None else {}),
        }

    def save_checkpoint(self) -> Path | None:
        """Write this step's checkpoint atomically (every process writes its share); returns its path on the main
        process."""
        started = time.time()
        self.accelerator.wait_for_everyone()
        temporary = ckpt.temporary_dir(self.checkpoint_dir, self.global_step)
        if self.is_main:
            ckpt.open_checkpoint(self.checkpoint_dir, self.global_step)
        self.accelerator.wait_for_everyone()
        self.strategy.save(temporary, self.model, self.optimizer)
        ckpt.save_rng(temporary, self.accelerator.process_index)
        self.accelerator.wait_for_everyone()
        path = None
        if self.is_main:
            path = ckpt.commit_checkpoint(temporary, self.scheduler, self._state(), self._scaler)
            protect = {f"step-{self.best_step:06d}"} if self.best_step is not None else set()
            ckpt.prune_checkpoints(self.checkpoint_dir, self.config.checkpoint.keep, protect)
        self.accelerator.wait_for_everyone()
        self.checkpoint_times.add(time.time() - started)
        return path

    # ------------------------------------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> None:
        self._previous_handlers = {}

        def handler(signum: int, _frame: Any) -> None:
            if self._signal is not None:  # a second signal: stop now, the first checkpoint may be in progress
                raise KeyboardInterrupt
            self._signal = signum
            self.log(
                f"received {signal.Signals(signum).name}: finishing step {self.global_step + 1}, then checkpointing"
            )

        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous_handlers[signum] = signal.signal(signum, handler)
            except ValueError:  # not the main thread (e.g. inside some test runners): no handler, no harm
                pass

    def _restore_signal_handlers(self) -> None:
        for signum, previous in getattr(self, "_previous_handlers", {}).items():
            signal.signal(signum, previous)

    def _interrupt(self) -> None:
        assert self._signal is not None
        path = self.save_checkpoint()
        where = self.config_path or str(self.run_dir / "config.yaml")
        message = (
            f"interrupted by {signal.Signals(self._signal).name} after step {self.global_step}; checkpoint written to {path}.\n"
            f"Resume with: posttrain train {where} output_dir={self.run_dir} resume=auto"
        )
        raise TrainingInterrupted(message, self._signal)

    # ------------------------------------------------------------------------------------------------ the end
    def _peak_memory_per_process(self) -> tuple[list[float], list[float | None]]:
        """Every process's peak memory in MiB (CUDA: allocated by torch; CPU: the resident set, imports included)
        and the peak its :class:`MemoryWatch` measured (tensor bytes, what the plan predicts), in rank order (a
        collective: every process calls it)."""
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        measured = self.memory.measured_peak()
        mine = (round(peak, 1), None if measured is None else round(measured / 2**20, 1))
        if self.world_size == 1:
            return [mine[0]], [mine[1]]
        from accelerate.utils import gather_object

        everyone = gather_object([mine])
        return [p for p, _ in everyone], [m for _, m in everyone]

    def _memory_summary(self, measured: list[float | None]) -> dict[str, Any]:
        """The plan's predicted peak per device against the measured peaks, as the summary and report show them."""
        if self.memory.plan is None:
            return {"memory_plan": f"unavailable ({self.memory.unavailable})"}
        predicted = self.memory.plan.tensor_peak / 2**20  # what the allocator or the CPU meter counts
        record: dict[str, Any] = {"memory_predicted_peak_mib": round(predicted, 1)}
        if all(value is not None for value in measured):
            record["memory_measured_peak_mib_per_process"] = measured
            record["memory_measured_by"] = self.memory.measured_by()
            record["memory_plan_error"] = round(max(measured) / predicted - 1, 4) if predicted else None  # type: ignore[type-var]
            record.update({f"memory_measured_{name}_bytes": b for name, b in self.memory.states.items()})
            tokens, trained = self.memory.largest_micro_batch
            if tokens:
                record["memory_measured_micro_batch_tokens"] = tokens
                record["memory_measured_micro_batch_trained_positions"] = trained
        return record

    def finish(self, model: Any, tokenizer: Any = None, summary: dict[str, Any] | None = None) -> dict[str, Any]:
        """The final model (the best checkpoint's after early stopping), final checkpoint, the model in Hugging
        Face format, plots and report. The summary's ``final_*`` figures are those of the evaluation that saw the
        saved model: the last step's (:meth:`should_evaluate`), or the best step's when its weights are restored."""
        final_eval = self.last_eval[1] if self.last_eval and self.last_eval[0] == self.global_step else None
        if self.stopped_early and self.best_step is not None and self.best_step != self.global_step:
            best = self.checkpoint_dir / f"step-{self.best_step:06d}"
            self.log(f"restoring the best checkpoint ({best.name}) as the final model")
            self.strategy.load_weights(best, model)
            final_eval = self.best_results
        elif not ckpt.is_complete(self.checkpoint_dir / f"step-{self.global_step:06d}"):
            self.save_checkpoint()
        model_dir = self.run_dir / "model"
        records: dict[str, Any] = {}
        self.strategy.save_pretrained(model, model_dir)  # every process: a sharded model is gathered
        peaks, measured = self._peak_memory_per_process()
        if self.is_main:
            if tokenizer is not None:
                tokenizer.save_pretrained(model_dir)
            trainable, total = self.trainable
            records = {
                "stage": self.config.stage,
                "peft_method": self.config.peft.method,
                "steps": self.global_step,
                "total_steps": self.total_steps,
                "trainable_parameters": trainable,
                "total_parameters": total,
                "tokens_trained": self.tokens_trained,
                "nonfinite_steps_skipped": self.nonfinite_total,
                f"best_{self.selection.metric}": self.best_eval if math.isfinite(self.best_eval) else None,
                "best_step": self.best_step,
                "stopped_early": self.stopped_early,
                **{f"final_{k}": v for k, v in (final_eval or {}).items()},
                "wall_time_s": round(time.time() - self.started, 1),
                "steps_per_epoch": self.steps_per_epoch,
                # Where the time went: the first step (warm-up), the others, each evaluation and checkpoint.
                "time_first_step_s": round(self.step_times.seconds[0], 4) if self.step_times.seconds else None,
                "time_steps_s": round(self.step_times.total, 4),
                "time_evaluations_s": [round(t, 4) for t in self.eval_times.seconds],
                "time_checkpoints_s": [round(t, 4) for t in self.checkpoint_times.seconds],
                # What each process needed at its peak (CUDA: allocated by torch; CPU: the process's resident
                # set, imports included); the plan is checked against tensor bytes (_memory_summary).
                "peak_memory_mib_per_process": peaks,
                **self._memory_summary(measured),
                **(summary or {}),
            }
            last = [r for r in read_metrics(self.metrics.path) if "loss" in r]
            if last:
                records["final_train_loss"] = last[-1]["loss"]
            # The summary as data, for scripts (benchmarks, a pipeline's next stage): report.md is for people.
            ckpt.write_atomic(self.run_dir / "summary.json", json.dumps(records, indent=1))
            plots = write_plots(self.run_dir) if self.config.logging.report else []
            report = write_report(self.run_dir, records, plots) if self.config.logging.report else None
            self.metrics.close()
            print(
                f"\ndone: {self.global_step} steps in {records['wall_time_s']} s\n"
                f"  model:   {model_dir}\n  metrics: {self.metrics.path}\n"
                f"  plots:   {self.run_dir / 'plots'}\n  report:  {report}",
                file=sys.stderr,
            )
        self.accelerator.wait_for_everyone()
        self.strategy.close()
        return records
