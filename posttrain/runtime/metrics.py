"""Metrics to ``metrics.jsonl`` (one JSON object a line, always) and TensorBoard (optional), and the progress bar."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any


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
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines() if json.loads(line).get("step", 0) <= step]
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


class Progress:
    """tqdm bar over optimizer steps with loss, tokens/s and ETA (tqdm computes the ETA)."""

    def __init__(self, total: int, initial: int, enabled: bool, description: str) -> None:
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=description, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, values: dict[str, float]) -> None:
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


def per_example_means(sums: dict[str, float]) -> dict[str, float]:
    """``sum/NAME`` divided by ``count/NAME`` (or by ``count``) as ``NAME``: per-example means (pairs, prompts,
    responses) of statistics summed over micro-batches and processes. Names whose count is 0 are left out."""
    means = {}
    for key, value in sums.items():
        if key.startswith("sum/"):
            name = key.split("/", 1)[1]
            count = sums.get(f"count/{name}", sums.get("count", 0.0))
            if count:
                means[name] = value / count
    return means
