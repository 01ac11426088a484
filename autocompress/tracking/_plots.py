"""Pareto plots: accuracy against size and latency, the front highlighted (PNG and HTML)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from autocompress.measure import METRICS, plotted_metrics


def pairs() -> tuple[tuple[str, str], ...]:
    """``(x, y)`` of each plot: accuracy against every metric the registry marks as plotted
    (read now: a metric registered after import is plotted too)."""
    return tuple((m.name, "accuracy") for m in plotted_metrics())


def _label(name: str) -> str:
    spec = METRICS.get(name)
    return spec.label or spec.name


def write_plots(trials: pd.DataFrame, baseline: dict[str, float], out_dir: Path) -> list[Path]:
    """Writes ``pareto_<x>.png`` and ``pareto.html`` for finished trials.

    Args:
        trials: One row per finished trial, with the metric columns, ``pareto`` (bool),
            ``trial`` (name) and ``summary`` (the plan in one line).
        baseline: The uncompressed model's metrics, drawn as a star.
        out_dir: Where to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for x, y in pairs():
        fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
        rest, front = trials[~trials["pareto"]], trials[trials["pareto"]].sort_values(x)
        ax.scatter(rest[x], rest[y], s=18, c="#9aa5b1", label="trial")
        ax.plot(front[x], front[y], "o-", c="#d9480f", ms=6, label="Pareto front")
        if x in baseline and y in baseline:
            ax.scatter([baseline[x]], [baseline[y]], marker="*", s=160, c="#1c7ed6",
                       label="baseline", zorder=5)
        ax.set_xscale("log")
        ax.set_xlabel(_label(x) + " (log scale)")
        ax.set_ylabel(_label(y))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"{_label(y)} vs {_label(x)}  ({len(trials)} trials)", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"pareto_{x}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    paths.append(_write_html(trials, baseline, out_dir / "pareto.html"))
    return paths


def _write_html(trials: pd.DataFrame, baseline: dict[str, float], path: Path) -> Path:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    plots = pairs()
    fig = make_subplots(rows=1, cols=len(plots),
                        subplot_titles=[f"accuracy vs {_label(x)}" for x, _ in plots])
    for col, (x, y) in enumerate(plots, start=1):
        for on_front, color, name in ((False, "#9aa5b1", "trial"), (True, "#d9480f", "Pareto front")):
            part = trials[trials["pareto"] == on_front].sort_values(x)
            fig.add_trace(go.Scatter(
                x=part[x], y=part[y], mode="markers+lines" if on_front else "markers",
                marker={"color": color, "size": 9 if on_front else 7}, name=name,
                showlegend=col == 1, text=part["trial"] + "<br>" + part["summary"],
                hovertemplate="%{text}<br>" + x + "=%{x}<br>" + y + "=%{y:.4f}<extra></extra>",
            ), row=1, col=col)
        if x in baseline:
            fig.add_trace(go.Scatter(x=[baseline[x]], y=[baseline[y]], mode="markers",
                                     marker={"symbol": "star", "size": 14, "color": "#1c7ed6"},
                                     name="baseline", showlegend=col == 1), row=1, col=col)
        fig.update_xaxes(type="log", title_text=_label(x), row=1, col=col)
        fig.update_yaxes(title_text=_label(y), row=1, col=col)
    fig.update_layout(height=480, width=1100, template="plotly_white")
    fig.write_html(path, include_plotlyjs=True, full_html=True)
    return path
