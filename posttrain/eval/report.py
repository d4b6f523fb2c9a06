"""A pipeline's report: ``OUT/eval.json``, ``OUT/report.md`` and a self-contained ``OUT/report.html``.

The HTML file carries everything inline (plots as base64 PNG, no scripts, no external styles), so it opens from
a mail attachment or an artefact store as it does from disk. It holds the evaluation table, the plots (training
loss of each supervised stage, reward / gold reward / KL of each RL stage, the table as bars), sample answers of
every model to the same held-out prompts, the stage timings, and the resolved config of every stage.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from posttrain.eval.common import text_table
from posttrain.runtime.metrics import read_metrics

if TYPE_CHECKING:  # for the annotations only: the pipeline calls this module, never the other way round
    from posttrain.pipeline import Pipeline, PipelineResult

# (column title, key in a model's figures, format)
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("exact match", "exact_match", "{:.3f}"),
    ("gold reward", "gold_reward", "{:.3f}"),
    ("RM score", "rm_score", "{:+.3f}"),
    ("KL to ref", "kl_to_reference", "{:.3f}"),
    ("length", "length", "{:.1f}"),
    ("EOS rate", "eos_rate", "{:.2f}"),
)
RL_CURVES = (
    ("reward", "reward (training signal)"),
    ("gold_reward", "gold reward (verifiable truth)"),
    ("kl", "KL to the reference"),
)


def eval_json(evaluation: dict[str, Any], reference_row: str | None) -> dict[str, Any]:
    """The figures as ``{"models": {row: {exact_match, gold_reward, rm_score, kl_to_sft|kl_to_reference, length,
    eos_rate}}, "reward_model": {"accuracy", ...}}`` (no answers or samples)."""
    kl_name = f"kl_to_{reference_row}" if reference_row else "kl_to_reference"
    models = {}
    for row, figures in evaluation.get("models", {}).items():
        models[row] = {key: figures.get(key) for _, key, _ in COLUMNS}
        models[row][kl_name] = models[row].pop("kl_to_reference")
    result: dict[str, Any] = {"models": models}
    if "reward_model" in evaluation:
        result["reward_model"] = evaluation["reward_model"]
    return result


def format_table(evaluation: dict[str, Any], reference_row: str | None = None) -> str:
    """The evaluation as a fixed-width text table (what the demo prints)."""
    titles = ["model"] + [
        title if key != "kl_to_reference" or not reference_row else f"KL to {reference_row}"
        for title, key, _ in COLUMNS
    ]
    rows = [
        [row] + [_cell(figures.get(key), fmt) for _, key, fmt in COLUMNS]
        for row, figures in evaluation.get("models", {}).items()
    ]
    lines = [text_table(titles, rows, rule=True)]
    if "reward_model" in evaluation:
        rm = evaluation["reward_model"]
        lines.append(
            f"\nreward model on held-out pairs: accuracy {rm['accuracy']:.3f}, mean gap {rm.get('mean_gap', float('nan')):.3f}"
        )
    return "\n".join(lines)


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def write_pipeline_report(pipeline: Pipeline, result: PipelineResult) -> dict[str, Path]:
    """Write eval.json, report.md and report.html into the pipeline's out directory; returns their paths."""
    evaluation = result.evaluation or {}
    reference_row = pipeline.reference_row()
    out = pipeline.out
    figures = eval_json(evaluation, reference_row)
    (out / "eval.json").write_text(json.dumps(figures, indent=1), encoding="utf-8")
    table = format_table(evaluation, reference_row)
    plots = _plots(pipeline, evaluation)
    (out / "report.md").write_text(_markdown(pipeline, result, table, plots), encoding="utf-8")
    (out / "report.html").write_text(_html(pipeline, result, evaluation, table, plots), encoding="utf-8")
    return {"eval": out / "eval.json", "markdown": out / "report.md", "html": out / "report.html"}


# ---- plots -----------------------------------------------------------------------------------------------------


def _plots(pipeline: Pipeline, evaluation: dict[str, Any]) -> list[tuple[str, bytes]]:
    """(title, PNG bytes) for every plot that has data."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    metrics = {name: read_metrics(pipeline.out / name / "metrics.jsonl") for name in pipeline.order}
    plots: list[tuple[str, bytes]] = []

    def save(title: str, figure: Any) -> None:
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=90)
        plt.close(figure)
        plots.append((title, buffer.getvalue()))

    models = evaluation.get("models", {})
    if models:
        figure, axis = plt.subplots(figsize=(7, 3.2))
        names = list(models)
        width = 0.38
        for offset, (key, label) in zip(
            (-width / 2, width / 2), (("exact_match", "exact match"), ("gold_reward", "gold reward"))
        ):
            axis.bar(
                [i + offset for i in range(len(names))], [models[n].get(key) or 0.0 for n in names], width, label=label
            )
        axis.set_xticks(range(len(names)), names)
        axis.set_ylim(0, 1)
        axis.set_title("held-out prompts, greedy answers")
        axis.legend(loc="upper left")
        axis.grid(axis="y", alpha=0.3)
        save("Exact match and gold reward per model", figure)

    supervised = {
        name: [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float)) and "reward" not in r]
        for name, rows in metrics.items()
    }
    supervised = {name: points for name, points in supervised.items() if points}
    if supervised:
        figure, axes = plt.subplots(1, len(supervised), figsize=(3.2 * len(supervised), 2.8), squeeze=False)
        for axis, (name, points) in zip(axes[0], supervised.items()):
            axis.plot(*zip(*points), linewidth=1.2)
            axis.set_title(f"{name}: train loss", fontsize=10)
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
        save("Training loss of each supervised stage", figure)

    rl = {name: rows for name, rows in metrics.items() if any("kl" in r and "reward" in r for r in rows)}
    if rl:
        figure, axes = plt.subplots(1, len(RL_CURVES), figsize=(10, 2.9), squeeze=False)
        for axis, (key, title) in zip(axes[0], RL_CURVES):
            for name, rows in rl.items():
                points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
                if points:
                    axis.plot(*zip(*points), linewidth=1.2, label=name)
            axis.set_title(title, fontsize=10)
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
        save("Online RL: reward, gold reward and KL per step", figure)
    return plots


# ---- documents -------------------------------------------------------------------------------------------------


def _machine() -> str:
    import torch

    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {'CUDA' if torch.cuda.is_available() else 'CPU only'}"


def _timings(result: PipelineResult) -> list[tuple[str, str]]:
    rows = []
    for name, seconds in result.seconds.items():
        rows.append((name, f"{seconds:.0f} s" + (" (reused)" if name in result.reused else "")))
    return rows


def _markdown(pipeline: Pipeline, result: PipelineResult, table: str, plots: list[tuple[str, bytes]]) -> str:
    lines = [
        f"# Pipeline report: {pipeline.source}",
        "",
        f"Output: `{pipeline.out}` · {_machine()}",
        "",
        "## Evaluation",
        "",
        "```",
        table,
        "```",
        "",
    ]
    lines += ["## Stages", "", "| stage | time |", "|---|---|"] + [f"| {name} | {t} |" for name, t in _timings(result)]
    lines += ["", f"Plots ({len(plots)}) and sample answers are in `report.html`.", ""]
    return "\n".join(lines)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead { background: #f2f2f2; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 12px; }
td.answer { text-align: left; font-family: monospace; }
"""


def _html(
    pipeline: Pipeline, result: PipelineResult, evaluation: dict[str, Any], table: str, plots: list[tuple[str, bytes]]
) -> str:
    esc = html.escape
    reference_row = pipeline.reference_row()
    models = evaluation.get("models", {})
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>posttrain report: {esc(pipeline.source)}</title><style>{STYLE}</style></head><body>"
    ]
    parts.append(
        f"<h1>Pipeline report</h1><p><code>{esc(pipeline.source)}</code> → <code>{esc(str(pipeline.out))}</code> · {esc(_machine())}</p>"
    )

    parts.append("<h2>Evaluation on held-out prompts</h2><table id='evaluation'><thead><tr><th>model</th>")
    parts += [
        f"<th>{esc(f'KL to {reference_row}' if key == 'kl_to_reference' and reference_row else title)}</th>"
        for title, key, _ in COLUMNS
    ]
    parts.append("</tr></thead><tbody>")
    for row, figures in models.items():
        parts.append(
            f"<tr><td>{esc(row)}</td>"
            + "".join(f"<td>{_cell(figures.get(key), fmt)}</td>" for _, key, fmt in COLUMNS)
            + "</tr>"
        )
    parts.append("</tbody></table>")
    if "reward_model" in evaluation:
        rm = evaluation["reward_model"]
        parts.append(f"<p>Reward model on held-out preference pairs: accuracy <b>{rm['accuracy']:.3f}</b>.</p>")

    parts.append("<h2>Plots</h2>")
    for title, png in plots:
        encoded = base64.b64encode(png).decode()
        parts.append(
            f"<figure><img alt='{esc(title)}' src='data:image/png;base64,{encoded}'><figcaption>{esc(title)}</figcaption></figure>"
        )

    samples = {row: figures.get("samples", []) for row, figures in models.items()}
    first = next(iter(samples.values()), [])
    if first:
        parts.append("<h2>Sample answers</h2><table id='samples'><thead><tr><th>prompt</th><th>reference</th>")
        parts += [f"<th>{esc(row)}</th>" for row in samples]
        parts.append("</tr></thead><tbody>")
        for i, sample in enumerate(first):
            cells = "".join(
                f"<td class='answer'>{esc(str(rows[i]['answer']) if i < len(rows) else '')}</td>"
                for rows in samples.values()
            )
            parts.append(
                f"<tr><td class='answer'>{esc(sample['prompt'])}</td><td class='answer'>{esc(str(sample['reference']))}</td>{cells}</tr>"
            )
        parts.append("</tbody></table>")

    parts.append("<h2>Stages</h2><table><thead><tr><th>stage</th><th>time</th></tr></thead><tbody>")
    parts += [f"<tr><td>{esc(name)}</td><td>{esc(t)}</td></tr>" for name, t in _timings(result)]
    parts.append("</tbody></table>")

    parts.append("<h2>Resolved configuration</h2>")
    for name in pipeline.order:
        resolved = pipeline.resolved[name]
        payload = resolved if isinstance(resolved, dict) else resolved.model_dump(mode="json")
        parts.append(
            f"<details><summary>{esc(name)}</summary><pre>{esc(yaml.safe_dump(payload, sort_keys=False))}</pre></details>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)
