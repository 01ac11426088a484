"""A one-page HTML report of an experiment's latest search.

``write_report(experiment_name, tracking_uri, out_path)`` reads the search from MLflow (the
parent run, its trials, the front and each front trial's ``plan.json``) and writes a single
self-contained HTML file (plotly.js inlined once, no network access needed to view it):

1. baseline facts: task, metric, size, latency, params, MACs, target and machine;
2. the front: accuracy against size and against latency, every trial in grey, the front
   highlighted, the baseline as a star (hover a point for its plan);
3. a table of the front models with the command that exports each;
4. per-layer heat maps of what the front chose (rows: front models, columns: layers): weight
   sparsity (``ch`` = channels removed), bit-width and kept rank.

The same file is logged to the parent run as ``report.html``.
"""

from __future__ import annotations

import html
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from autocompress.compress import heat_maps
from autocompress.deploy._rebuild import download_text, quiet_downloads
from autocompress.measure import front_columns
from autocompress.tracking import (
    PARETO,
    TRIAL_METRICS,
    latest_search,
    open_store,
    read_front,
    read_trials,
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1200px;
color:#212529;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2.2rem;
border-bottom:1px solid #dee2e6;padding-bottom:.3rem}.sub{color:#6c757d;margin-top:0}
table{border-collapse:collapse;font-size:.9rem}td,th{padding:.3rem .7rem;text-align:left;
border-bottom:1px solid #e9ecef}th{background:#f8f9fa}td.num{text-align:right;
font-variant-numeric:tabular-nums}code{font-size:.85em;background:#f1f3f5;padding:0 .2em}
.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:.5rem 1.5rem}
.facts div{border-left:3px solid #1c7ed6;padding-left:.6rem}.facts b{display:block;
font-size:.75rem;color:#6c757d;font-weight:500;text-transform:uppercase}
"""


def write_report(experiment_name: str, tracking_uri: str, out_path: str | Path) -> Path:
    """Writes the HTML report of the latest search of ``experiment_name`` and logs it.

    Args:
        experiment_name: The MLflow experiment (the experiment file's ``name``).
        tracking_uri: The MLflow store the search logged to.
        out_path: The HTML file to write.

    Returns:
        ``out_path``.

    Raises:
        ConfigError: No such experiment, or it holds no search.
    """
    quiet_downloads()
    client = open_store(tracking_uri, must_exist=True)
    parent = latest_search(client, experiment_name)
    parent_id = parent.info.run_id
    config = json.loads(download_text(client, parent_id, "experiment.json"))
    trials = [_trial_row(r) for r in read_trials(client, parent_id) if r.info.status == "FINISHED"]
    front = read_front(tracking_uri, experiment_name)
    baseline = {k.removeprefix("baseline_"): v for k, v in parent.data.metrics.items()
                if k.startswith("baseline_")}

    figures = [_front_figure(trials, baseline), *_heatmaps(front, _layer_order(front, trials))]
    plots = [fig.to_html(full_html=False, include_plotlyjs=i == 0, config={"displaylogo": False})
             for i, fig in enumerate(figures)]
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(parent.info.start_time / 1000))
    body = [
        f"<h1>autocompress: {html.escape(experiment_name)}</h1>",
        f"<p class=sub>search run <code>{parent_id}</code>, started {started}; "
        f"{len(trials)} finished trials, {len(front)} on the Pareto front "
        f"(status {parent.info.status})</p>",
        "<h2>Baseline</h2>", _facts(config, baseline, parent.data.tags),
        "<h2>Pareto front</h2>", plots[0],
        "<h2>Front models</h2>", _front_table(front, tracking_uri),
        "<h2>What the front models chose, per layer</h2>",
        "<p class=sub>Rows: front models (best accuracy first); columns: layers. "
        "<code>ch</code> = output channels removed, otherwise the fraction of weights masked; "
        "bits = weight bit-width (fp32 = not quantized); rank = kept fraction of full rank "
        "(full = not factorized).</p>",
        *plots[1:],
    ]
    page = (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>autocompress: "
            f"{html.escape(experiment_name)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(page, encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(out_path, Path(tmp) / "report.html")
        client.log_artifact(parent_id, str(Path(tmp) / "report.html"))
    return out_path


def _trial_row(run) -> dict[str, Any]:
    m = run.data.metrics
    return {"trial": run.info.run_name, "run_id": run.info.run_id,
            "pareto": run.data.tags.get(PARETO) == "true",
            "summary": run.data.tags.get("autocompress.summary", ""),
            **{k: m[k] for k in TRIAL_METRICS if k in m}}


def _front_figure(trials: list[dict], baseline: dict[str, float]):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    axes = (("size_bytes", "size (KiB)", 1 / 1024), ("latency_ms", "latency (ms)", 1.0))
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.08,
                        subplot_titles=[f"accuracy vs {label}" for _, label, _ in axes])
    for col, (key, label, scale) in enumerate(axes, start=1):
        for on_front, color, name in ((False, "#adb5bd", "trial"), (True, "#d9480f", "Pareto front")):
            part = sorted((t for t in trials if t["pareto"] == on_front and key in t),
                          key=lambda t: t[key])
            fig.add_trace(go.Scatter(
                x=[t[key] * scale for t in part], y=[t["accuracy"] for t in part],
                mode="markers+lines" if on_front else "markers", name=name, showlegend=col == 1,
                legendgroup=name, marker={"color": color, "size": 10 if on_front else 7},
                line={"dash": "dot", "width": 1},
                text=[f"<b>{t['trial']}</b> {t['run_id']}<br>{_wrap(t['summary'])}" for t in part],
                hovertemplate="%{text}<br>" + label + " %{x:.4g}<br>accuracy %{y:.4f}<extra></extra>",
            ), row=1, col=col)
        if key in baseline and "accuracy" in baseline:
            fig.add_trace(go.Scatter(
                x=[baseline[key] * scale], y=[baseline["accuracy"]], mode="markers", name="baseline",
                legendgroup="baseline", showlegend=col == 1,
                marker={"symbol": "star", "size": 16, "color": "#1c7ed6"},
                hovertemplate="baseline<br>" + label + " %{x:.4g}<br>accuracy %{y:.4f}<extra></extra>",
            ), row=1, col=col)
        fig.update_xaxes(type="log", title_text=label + " (log scale)", row=1, col=col)
        fig.update_yaxes(title_text="accuracy", row=1, col=col)
    fig.update_layout(height=460, template="plotly_white", margin={"t": 40, "b": 40},
                      legend={"orientation": "h", "y": -0.18})
    return fig


def _wrap(text: str) -> str:
    return html.escape(text).replace(" | ", "<br>")


def _heatmaps(front: list[dict], layers: list[str]) -> list:
    """Sparsity, bits and rank heat maps (rows: front models, columns: layers)."""
    import plotly.graph_objects as go

    if not front:
        return []
    rows = [f"{r['trial']} ({r.get('accuracy', float('nan')):.4f})" for r in front]

    def knob(row: dict, layer: str) -> dict:
        return row["plan"].get("layers", {}).get(layer, {})

    figures = []
    for heat in heat_maps():  # one per knob, from the knob table
        cells = [[heat.cell(knob(row, layer)) for layer in layers] for row in front]
        fig = go.Figure(go.Heatmap(
            z=[[c[0] for c in r] for r in cells], text=[[c[1] for c in r] for r in cells],
            x=layers, y=rows, colorscale=heat.colorscale, texttemplate="%{text}", xgap=2, ygap=2,
            hovertemplate="%{y}<br>%{x}: %{text}<extra></extra>", **heat.layout))
        fig.update_layout(title=heat.title, template="plotly_white", height=120 + 28 * len(front),
                          margin={"t": 40, "b": 30, "l": 10}, yaxis={"autorange": "reversed"})
        figures.append(fig)
    return figures


def _layer_order(front: list[dict], trials: list[dict]) -> list[str]:
    """The layers of the front's plans, in model order as far as the logs tell.

    ``plan.json`` lists layers sorted by name; each trial's one-line summary lists the layers
    its plan changes in model order (the warm-start trial changes them all). The summaries are
    merged, each new name placed after its predecessor; names only in plans follow.
    """
    layers: list[str] = []
    for row in [*trials, *front]:
        previous = None
        for part in row.get("summary", "").split(" | "):
            name = part.partition(": ")[0]
            if name and name != "(no compression)" and name not in layers:
                layers.insert(layers.index(previous) + 1 if previous else 0, name)
            previous = name if name in layers else previous
    planned = {name for row in front for name in row["plan"].get("layers", {})}
    return [n for n in layers if n in planned] + sorted(planned - set(layers))


def _facts(config: dict, baseline: dict[str, float], tags: dict[str, str]) -> str:
    target = config.get("target", {})
    facts = [
        ("task", config.get("task")),
        ("accuracy (validation)", _num(baseline.get("accuracy"), "{:.4f}")),
        ("size", _num(baseline.get("size_bytes"), lambda v: f"{v / 1024:.1f} KiB ({v:,.0f} bytes)")),
        ("latency (median)", _num(baseline.get("latency_ms"), "{:.4f} ms")),
        ("params", _num(baseline.get("params"), "{:,.0f}")),
        ("MACs per sample", _num(baseline.get("macs"), "{:,.0f}")),
        ("target", f"{target.get('runtime')}/{target.get('device')}, {target.get('threads')} "
                   f"thread(s), batch {target.get('batch_size')}"),
        ("objectives", ", ".join(f"{o['metric']} ({o['mode']})" for o in config.get("objectives", []))),
        ("max accuracy drop", (config.get("constraints") or {}).get("max_accuracy_drop")),
        ("sampler", "{sampler}, {trials} trials, seed {seed}".format(**{
            "sampler": None, "trials": None, "seed": None, **(config.get("search") or {})})),
        ("fine-tuning", ", ".join(f"{k} {v}" for k, v in (config.get("finetune") or {}).items())),
    ]
    facts += [(k.removeprefix("autocompress."), v) for k, v in sorted(tags.items())
              if k.removeprefix("autocompress.") in ("cpu", "torch", "onnxruntime", "python")]
    return "<div class=facts>" + "".join(
        f"<div><b>{html.escape(k)}</b>{html.escape(str(v))}</div>" for k, v in facts) + "</div>"


def _num(value: float | None, fmt) -> str:
    if value is None:
        return "n/a"
    return fmt(value) if callable(fmt) else fmt.format(value)


def _front_table(front: list[dict], tracking_uri: str) -> str:
    if not front:
        return "<p>No trial is on the front (all failed or were infeasible).</p>"
    columns = front_columns()
    head = ("trial", "run id", *(h for _, h, _ in columns), "plan")
    rows = []
    for r in front:
        cells = [f"<td>{html.escape(str(r.get('trial')))}</td>", f"<td><code>{r['run_id']}</code></td>",
                 *(f"<td class=num>{_num(r.get(k), fmt)}</td>" for k, _, fmt in columns),
                 f"<td>{html.escape(r.get('summary', ''))}</td>"]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    example = front[0]["run_id"]
    return ("<table id=front-table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
            + "".join(rows) + "</table>"
            f"<p class=sub>Export one: <code>autocompress export {example} --format onnx --out dist/ "
            f"--tracking-uri {html.escape(tracking_uri)}</code></p>")
