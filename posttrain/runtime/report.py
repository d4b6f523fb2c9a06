"""End-of-run artefacts: ``plots/*.png`` from ``metrics.jsonl`` and a ``report.md`` that summarises the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.runtime.metrics import read_metrics

CURVES = {
    "loss": ("train loss", "loss"),
    "eval_loss": ("validation loss", "eval_loss"),
    "lr": ("learning rate", "lr"),
    "grad_norm": ("gradient norm (before clipping)", "grad_norm"),
}


def write_plots(run_dir: Path) -> list[Path]:
    """One PNG per curve that has data."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir / "metrics.jsonl")
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    written = []
    for name, (title, key) in CURVES.items():
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if not points:
            continue
        figure, axis = plt.subplots(figsize=(6, 3.5))
        steps, values = zip(*points)
        axis.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3)
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        figure.tight_layout()
        path = plots_dir / f"{name}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def write_report(run_dir: Path, summary: dict[str, Any], plots: list[Path]) -> Path:
    """A short Markdown report: what ran, the outcome, where everything is."""
    lines = [f"# {summary.get('stage', 'run')} run: {run_dir.name}", ""]
    lines += ["| | |", "|---|---|"]
    for key, value in summary.items():
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {shown} |")
    lines += ["", "## Curves", ""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots] or ["(no metrics recorded)"]
    lines += [
        "",
        "## Files",
        "",
        "- `config.yaml`: the resolved config this run used",
        "- `metrics.jsonl`: one line of metrics per logged step (also in `tensorboard/`)",
        "- `model/`: the trained model or adapter in Hugging Face format",
        "- `checkpoints/`: resumable checkpoints (`resume: auto` continues the newest)",
        "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
