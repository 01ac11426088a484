"""Post-training compression, side by side: calibrated methods (GPTQ, AWQ, Wanda, SparseGPT,
reconstruction after structured pruning) against their data-free counterparts (round-to-nearest,
magnitude), with no fine-tuning, on all-MiniLM-L6-v2 and on the bench CNNs (issue 25's
"Numbers to reach").

Usage::

    make bench-posttraining          # = .venv/bin/python bench/posttraining.py
    .venv/bin/python bench/posttraining.py [--repeats 7] [--samples 256] [--draws 3]
        [--only minilm|cnn] [--quick] [--out bench/posttraining.json]

**all-MiniLM-L6-v2** (the built-in ``minilm`` task). Every row is one plan applied by
``autocompress.compress.apply`` with one calibration set (``--samples`` training sentences of
32 tokens, drawn once and shared by every row), exported as the deployable ONNX file
(``export_onnx(..., dynamic_sequence=True)``: one file runs at any sequence length). Fidelity is
the mean cosine similarity of that ONNX file's embeddings (run by ONNX Runtime) to the fp32
model's on the 256 held-out sentences, at 32 tokens (the task's metric) and at 128 tokens (the
same sentences, untruncated). Rows:

- 4-bit weights, group 128, on the 36 Linear layers (the embeddings at 8 bits in every row):
  ``quantizer`` rtn / gptq / awq;
- 50% unstructured sparsity of the 36 Linear layers: ``pruner`` magnitude / wanda / sparsegpt;
  2:4 (``structure: "2:4"``) with each;
- 30% of the heads (``round(0.3 * 12) = 4`` of 12 per block) and 30% of the FFN neurons
  removed in every block (``structure: channel`` on ``attention.self.query`` and
  ``intermediate.dense``): ``pruner: magnitude`` (no reconstruction) and ``pruner:
  sparsegpt`` (the next layer refit on the calibration inputs);
- anchors: the fp32 ONNX export and ONNX Runtime's ``quantize_dynamic`` of it
  (``bench/minilm.py``'s helpers).

Latency (every row but the sparse ones, which are fp32 graphs holding zeros: fp32's speed,
``bench/latency.py``): ONNX Runtime, 1 thread, batch 1, at
seq 128 and seq 32, timed by ``bench/latency.py``'s round-robin (``--repeats`` rounds in a
shuffled order, the table gives the median of the round medians). Size: ``size_bytes`` of
the compressed model (the packed artifact's bytes), fp32's over the row's, and the ONNX file.
The issue's target is printed beside each calibrated row; PASS when the fidelity reaches it
at both sequence lengths.

**The bench CNNs** (the built-in ``digits``, ``mnist1d`` and ``digits_resnet`` tasks): every
layer at 4 and 3 bits per output channel, ``quantizer`` rtn / gptq / awq, accuracy on the
validation split against fp32; the calibrated rows are the median over ``--draws``
calibration draws of ``--samples`` training samples. Target: a calibrated method loses at most
half of what round-to-nearest loses (``loss <= max(rtn loss, 0) / 2``).

A row whose method is not available (a ``PlanError`` such as "not implemented yet") or fails
is kept with its error, so the run always completes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency import Config, Variant, facts, run_benchmark, summarize  # noqa: E402
from minilm import fidelity, quantize_dynamic  # noqa: E402

from autocompress.compress import (  # noqa: E402
    Calibration,
    LayerInfo,
    LayerPlan,
    Plan,
    PlanError,
    apply,
    describe_layers,
)
from autocompress.measure import Target, size_bytes  # noqa: E402
from autocompress.onnxgraph import export_onnx  # noqa: E402
from autocompress.tasks import load_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CNN_TASKS = ("digits", "mnist1d", "digits_resnet")
CNN_BITS = (4, 3)
QUANTIZERS = ("rtn", "gptq", "awq")
PRUNERS = ("magnitude", "wanda", "sparsegpt")
SEQS = (128, 32)
STRUCTURED_RATIO = 0.3  # of the heads and of the FFN neurons
BASELINE = "fp32 ONNX"  # the anchor every speed-up and size ratio is relative to


# --------------------------------------------------------------------------------------------
# MiniLM: the rows


@dataclass(frozen=True)
class Spec:
    """One MiniLM row to build: a plan (None: an anchor built otherwise)."""

    section: str
    name: str
    plan: Plan | None
    target: float | None = None  # minimum fidelity (issue 25)
    timed: bool = False

    @property
    def key(self) -> str:
        """Unique among the rows (a method's name recurs in several sections)."""
        return self.name if self.section == "anchor" else f"{self.section} / {self.name}"


def _allowed(layer: LayerInfo, **knobs: Any) -> bool:
    """Whether ``layer`` takes every one of ``knobs`` (no refusal names it)."""
    return layer.used and not any(r.knob in knobs and r.value in (None, knobs[r.knob])
                                  for r in layer.refusals)


def _every(layers: list[LayerInfo], types: tuple[str, ...], **knobs: Any) -> dict[str, LayerPlan]:
    """``knobs`` on every used layer of ``types`` that takes them."""
    return {la.name: LayerPlan(**knobs) for la in layers if la.type in types and _allowed(la, **knobs)}


def structured_plan(layers: list[LayerInfo], ratio: float, pruner: str) -> Plan:
    """``ratio`` of the heads (on each block's query projection) and of the FFN neurons (on each
    ``intermediate.dense``) removed, chosen by ``pruner``."""
    cut = ("attention.self.query", "intermediate.dense")
    return Plan({la.name: LayerPlan(sparsity=ratio, structure="channel", pruner=pruner)
                 for la in layers if la.used and la.name.endswith(cut)})


def minilm_specs(layers: list[LayerInfo]) -> list[Spec]:
    """The MiniLM rows, in table order (see the module docstring)."""
    embeddings = _every(layers, ("Embedding",), bits=8)
    specs = [Spec("anchor", BASELINE, None, timed=True),
             Spec("anchor", "ORT quantize_dynamic", None, timed=True)]
    for q in QUANTIZERS:
        linear = _every(layers, ("Linear",), bits=4, group_size=128, quantizer=q)
        specs.append(Spec("4-bit weights, group 128", q.upper(), Plan({**embeddings, **linear}),
                          None if q == "rtn" else 0.99, timed=True))
    for structure, section, target in (("unstructured", "50% unstructured", 0.99),
                                       ("2:4", "2:4 (50%)", 0.98)):
        for p in PRUNERS:
            linear = _every(layers, ("Linear",), sparsity=0.5, structure=structure, pruner=p)
            specs.append(Spec(section, p, Plan(linear), None if p == "magnitude" else target))
    section = f"{STRUCTURED_RATIO:.0%} heads + FFN removed"
    specs.append(Spec(section, "magnitude, no reconstruction",
                      structured_plan(layers, STRUCTURED_RATIO, "magnitude"), timed=True))
    specs.append(Spec(section, "reconstruction (sparsegpt)",
                      structured_plan(layers, STRUCTURED_RATIO, "sparsegpt"), 0.98, timed=True))
    return specs


@dataclass
class Row:
    """One MiniLM row's results."""

    section: str
    name: str
    target: float | None
    plan: str = ""
    fidelity: dict[int, float] = field(default_factory=dict)  # seq -> of the ONNX file
    size_bytes: int | None = None
    size_ratio: float | None = None
    onnx_mb: float | None = None
    onnx_sha256: str | None = None
    same_as: str | None = None  # an earlier row of its section whose ONNX file is identical
    build_s: float = 0.0  # apply (calibration included) + size + ONNX export
    score_s: float = 0.0  # the fidelity runs, every sequence length
    latency_ms: dict[int, float] = field(default_factory=dict)
    speedup: dict[int, float] = field(default_factory=dict)  # median fp32 / median row
    speedup_best: dict[int, float] = field(default_factory=dict)  # fastest fp32 / fastest row
    error: str | None = None

    @property
    def verdict(self) -> str:
        """PASS / MISS against the target at every sequence length; ``—`` without a target."""
        if self.target is None:
            return "—"
        if self.error or not self.fidelity:
            return "n/a"
        return "PASS" if min(self.fidelity.values()) >= self.target else "MISS"


def _guarded(what: str, fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """``fn()``, or its error as text (printed with its traceback): a method that is not
    available or fails becomes a row with an error, not a failed run."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - any method's failure is reported, not fatal
        print(f"posttraining: {what}: {type(e).__name__}: {e}", file=sys.stderr)
        if not isinstance(e, PlanError):  # a refusal says all; anything else is a bug to see
            traceback.print_exc(file=sys.stderr)
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def build_onnx(task: Any, spec: Spec, calibration: Calibration, work: Path,
               files: dict[str, Path]) -> Row:
    """Builds ``spec``'s deployable ONNX file into ``files`` and fills what is known without
    running it."""
    row = Row(spec.section, spec.name, spec.target)
    path = work / f"row{len(files)}.onnx"
    started = time.perf_counter()
    if spec.plan is None and spec.name == BASELINE:
        done, row.error = _guarded(spec.name, lambda: export_onnx(
            task.model, task.example_inputs, path, dynamic_sequence=True))
        row.plan, row.size_bytes = "(no compression)", size_bytes(task.model)
    elif spec.plan is None:
        done, row.error = _guarded(spec.name, lambda: quantize_dynamic(files[BASELINE], path))
        row.plan = "onnxruntime.quantization.quantize_dynamic(fp32, QInt8)"
    else:
        row.plan = spec.plan.summary()

        def make() -> Path:
            model = apply(task.model, spec.plan, task.example_inputs, calibration=calibration)
            row.size_bytes = size_bytes(model)
            return export_onnx(model.eval(), task.example_inputs, path, dynamic_sequence=True)

        done, row.error = _guarded(f"{spec.section} / {spec.name}", make)
    row.build_s = time.perf_counter() - started
    if done is not None:
        files[spec.key] = path
        row.onnx_mb = path.stat().st_size / 1e6
        row.onnx_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return row


def held_out(task: Any, seq: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """The task's held-out sentences tokenized to ``seq`` tokens, with the fp32 model's
    embeddings as targets (``seq == 32``: the task's own validation batches)."""
    from autocompress.tasks.minilm import SEQ_LEN, TRAIN, VAL, _load_pretrained, sentences

    if seq == SEQ_LEN:
        return list(task.val_loader)
    tokenizer = _load_pretrained()[1]
    tokens = tokenizer(sentences(TRAIN + VAL)[TRAIN:], padding="max_length", truncation=True,
                       max_length=seq, return_tensors="pt")
    out = []
    with torch.no_grad():
        for i in range(0, VAL, 64):
            x = {k: tokens[k][i:i + 64] for k in ("input_ids", "attention_mask")}
            out.append((x, task.model(**x)))
    return out


def time_rows(rows: list[Row], specs: list[Spec], files: dict[str, Path],
              inputs: dict[int, Any], repeats: int) -> dict[int, dict]:
    """Times the timed rows' ONNX files at every sequence length, round-robin
    (``bench/latency.py``); fills each row's latency and speed-up."""
    target = Target(runtime="onnxruntime", threads=1, batch_size=1, warmup=10, min_runs=20,
                    max_runs=2000, budget_s=0.3)
    timed = [s.key for s in specs if s.timed and s.key in files]
    configs = []
    for seq, x in inputs.items():
        variants = [Variant("baseline" if name == BASELINE else name, Plan(), torch.nn.Identity(),
                            1, 0, 0, 0, files[name]) for name in timed]
        configs.append(Config(f"all-MiniLM-L6-v2 seq {seq}", "onnxruntime", 1, x, variants, target))
    run_benchmark(configs, repeats)
    summaries = {}
    by_key = {s.key: r for s, r in zip(specs, rows, strict=True)}
    for seq, config in zip(inputs, configs, strict=True):
        summaries[seq] = summarize(config)
        for s in summaries[seq]["rows"]:
            row = by_key[BASELINE if s["variant"] == "baseline" else s["variant"]]
            row.latency_ms[seq], row.speedup[seq] = s["latency_ms"], s["speedup"]
            row.speedup_best[seq] = s["speedup_best"]
    return summaries


def run_minilm(samples: int, repeats: int, seqs: Iterable[int]) -> dict[str, Any]:
    """Builds, scores and times every MiniLM row."""
    clock = time.perf_counter()
    task = load_task("minilm")
    layers = describe_layers(task.model, task.example_inputs)
    calibration = Calibration.from_task(task, samples)
    specs = minilm_specs(layers)
    phases = {"load_s": time.perf_counter() - clock}
    data = {seq: held_out(task, seq) for seq in seqs}
    phases["held_out_s"] = time.perf_counter() - clock - phases["load_s"]
    files: dict[str, Path] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-posttraining-") as work:
        for spec in specs:
            row = build_onnx(task, spec, calibration, Path(work), files)
            scored = time.perf_counter()
            if spec.key in files:
                for seq, batches in data.items():
                    row.fidelity[seq] = fidelity(files[spec.key], SimpleNamespace(val_loader=batches))
            row.score_s = time.perf_counter() - scored
            print(f"posttraining: minilm {spec.key}: fidelity {row.fidelity} (built in "
                  f"{row.build_s:.0f} s, scored in {row.score_s:.0f} s)"
                  f"{' ' + row.error if row.error else ''}", file=sys.stderr)
            row.same_as = next((r.name for r in rows if r.section == row.section and r.onnx_sha256
                                and r.onnx_sha256 == row.onnx_sha256), None)
            rows.append(row)
        base = rows[0].size_bytes
        for row in rows:
            row.size_ratio = base / row.size_bytes if base and row.size_bytes else None
        inputs = {seq: {k: v[:1] for k, v in data[seq][0][0].items()} for seq in data}
        clock = time.perf_counter()
        timing = time_rows(rows, specs, files, inputs, repeats)
        phases["timing_s"] = time.perf_counter() - clock
    return {"calibration_samples": calibration.samples, "seqs": list(data), "phases": phases,
            "rows": [{**asdict(r), "verdict": r.verdict} for r in rows], "timing": timing}


# --------------------------------------------------------------------------------------------
# The bench CNNs


def quantized_plan(layers: list[LayerInfo], bits: int, quantizer: str) -> tuple[Plan, list[str]]:
    """``bits`` per output channel on every used layer by ``quantizer``; a layer that refuses
    it takes round-to-nearest (listed second)."""
    entries, fallback = {}, []
    for la in layers:
        if not la.used:
            continue
        q = quantizer if _allowed(la, quantizer=quantizer) else "rtn"
        if q != quantizer:
            fallback.append(la.name)
        entries[la.name] = LayerPlan(bits=bits, quantizer=q)
    return Plan(entries), fallback


def cnn_results(task: Any, bits_list: Iterable[int] = CNN_BITS,
                quantizers: Iterable[str] = QUANTIZERS, samples: int = 256,
                draws: int = 3) -> list[dict[str, Any]]:
    """Per (bits, quantizer): the accuracy after compression (median over ``draws``
    calibration draws for the calibrated ones), its loss against fp32 in points, and the
    verdict against the target (at most half of round-to-nearest's loss)."""
    layers = describe_layers(task.model, task.example_inputs)
    fp32 = task.evaluate(task.model)
    calibrations = [Calibration.from_task(task, samples) for _ in range(draws)]
    out = []
    for bits in bits_list:
        rtn_loss = None
        for q in quantizers:
            plan, fallback = quantized_plan(layers, bits, q)
            cals = calibrations[:1] if q == "rtn" else calibrations

            def score(cal: Calibration, plan: Plan = plan) -> float:
                return task.evaluate(apply(task.model, plan, task.example_inputs, calibration=cal))

            scores, error = _guarded(f"{task.name} {bits} bits {q}", lambda: [score(c) for c in cals])
            acc = statistics.median(scores) if scores else None
            loss = None if acc is None else 100 * (fp32 - acc)
            if q == "rtn":
                rtn_loss = loss
            verdict = "—"
            if q != "rtn":
                verdict = ("n/a" if loss is None or rtn_loss is None
                           else "PASS" if loss <= max(rtn_loss, 0.0) / 2 else "MISS")
            out.append({"task": task.name, "bits": bits, "quantizer": q, "fp32": fp32,
                        "accuracy": acc, "accuracies": scores, "loss_pt": loss,
                        "rtn_loss_pt": rtn_loss, "verdict": verdict, "rtn_layers": fallback,
                        "error": error})
    return out


def run_cnns(names: Iterable[str], samples: int, draws: int) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        rows += cnn_results(load_task(name), samples=samples, draws=draws)
        print(f"posttraining: {name} done", file=sys.stderr)
    return rows


# --------------------------------------------------------------------------------------------
# Tables


def _num(x: float | None, fmt: str = ".4f", none: str = "—") -> str:
    return none if x is None else format(x, fmt)


def _short(error: str, width: int = 70) -> str:
    """An error for a table cell: without the layer it names, cut to ``width``."""
    text = error.split(": ", 1)[-1]
    if text.startswith("layer '"):
        text = text.split("': ", 1)[-1]
    return text if len(text) <= width else text[:width - 1] + "…"


def minilm_table(result: dict[str, Any]) -> str:
    """The MiniLM table (markdown)."""
    seqs = result["seqs"]
    timed = [s for s in seqs if any(s in r["latency_ms"] or str(s) in r["latency_ms"]
                                     for r in result["rows"])]
    head = ["section", "method", *[f"fidelity seq {s}" for s in seqs], "target", "verdict",
            "size ratio", "ONNX MB", *[f"seq {s}: ms, speed-up (best)" for s in timed], "build s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in result["rows"]:
        def at(d: dict, s: int) -> Any:
            return d.get(s, d.get(str(s)))

        fid = [_num(at(r["fidelity"], s)) for s in seqs]
        lat = [f"{at(r['latency_ms'], s):.2f}, {at(r['speedup'], s):.2f}x "
               f"({at(r.get('speedup_best', {}), s):.2f}x)"
               if at(r["latency_ms"], s) is not None else "" for s in timed]
        name = r["name"] if not r["error"] else f"{r['name']} ({_short(r['error'])})"
        if r.get("same_as"):  # e.g. a knob the method ignores: say so, not a number
            name += f" (the same ONNX file as {r['same_as']})"
        lines.append("| " + " | ".join([
            r["section"], name, *fid, "" if r["target"] is None else f"≥ {r['target']}",
            "" if r["verdict"] == "—" else f"**{r['verdict']}**", _num(r["size_ratio"], ".2f") + "x"
            if r["size_ratio"] else "—", _num(r["onnx_mb"], ".1f"), *lat,
            f"{r['build_s']:.0f}"]) + " |")
    return "\n".join(lines)


def cnn_table(rows: list[dict[str, Any]]) -> str:
    """The CNN table (markdown): one line per task and bit-width."""
    lines = ["| task | bits | fp32 acc | RTN loss pt | GPTQ loss pt | GPTQ ≤ ½ RTN | AWQ loss pt "
             "| AWQ ≤ ½ RTN |",
             "|---|---:|---:|---:|---:|---|---:|---|"]
    keys = sorted({(r["task"], r["bits"]) for r in rows}, key=lambda k: (CNN_TASKS.index(k[0])
                  if k[0] in CNN_TASKS else 99, k[0], -k[1]))
    for task, bits in keys:
        by_q = {r["quantizer"]: r for r in rows if (r["task"], r["bits"]) == (task, bits)}
        cells = []
        for q in QUANTIZERS:
            r = by_q.get(q)
            loss = "—" if r is None else (_num(r["loss_pt"], "+.2f") if not r["error"]
                                          else f"({_short(r['error'])})")
            cells.append(loss if q == "rtn" else f"{loss} | {r['verdict'] if r else ''}")
        fp32 = next(iter(by_q.values()))["fp32"]
        lines.append(f"| {task} | {bits} | {fp32:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7, help="timing rounds (default 7)")
    p.add_argument("--samples", type=int, default=256, help="calibration samples (default 256)")
    p.add_argument("--draws", type=int, default=3, help="calibration draws per CNN row (default 3)")
    p.add_argument("--only", choices=("minilm", "cnn"), help="run one half only")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 timing rounds, seq 32 only, 1 draw, digits only")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results (default bench/posttraining.json; -quick.json with --quick)")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="print the tables of an earlier run's JSON and exit (nothing is run)")
    return p.parse_args(argv)


def render(result: dict[str, Any]) -> str:
    """The tables of a run (markdown)."""
    parts = []
    if "minilm" in result:
        parts.append("## all-MiniLM-L6-v2, post-training only\n\n" + minilm_table(result["minilm"]))
    if "cnn" in result:
        parts.append("## Bench CNNs: accuracy loss after post-training quantization\n\n"
                     + cnn_table(result["cnn"]))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return 0
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    started = time.perf_counter()
    quick = args.quick
    out = args.out or ROOT / "bench" / ("posttraining-quick.json" if quick else "posttraining.json")
    result: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                              "command": " ".join(["bench/posttraining.py", *(argv or sys.argv[1:])]),
                              "machine": facts(), "load_average_start": os.getloadavg()}
    if args.only != "cnn":
        result["minilm"] = run_minilm(args.samples, 2 if quick else args.repeats,
                                      (32,) if quick else SEQS)
    if args.only != "minilm":
        result["cnn"] = run_cnns(CNN_TASKS[:1] if quick else CNN_TASKS, args.samples,
                                 1 if quick else args.draws)
    print("\n" + render(result))
    result["wall_s"] = time.perf_counter() - started
    result["load_average_end"] = os.getloadavg()
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"\n{result['wall_s']:.0f} s; results in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
