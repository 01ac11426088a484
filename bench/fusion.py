"""Graph forms on all-MiniLM-L6-v2: plain ONNX vs ONNX Runtime's transformer fusions
(``target.graph: fused``), fp32 and dynamic int8, batch 1, 1 thread, seq 32 and 128.

Usage::

    .venv/bin/python bench/fusion.py [--seq 32 128] [--attn sdpa eager] [--budget 3] [--repeats 3]

For each attention implementation the model is exported (``autocompress.onnxgraph.export_onnx``)
as ``fp32`` and as ``dyn-int8`` (``bits: 8, act_bits: dynamic`` on every Linear, what
``quantize_dynamic`` does), each in its plain form and fused (:func:`autocompress.onnxgraph.fuse`,
verified against the plain one); each pair is timed interleaved
(:func:`autocompress.measure._paired.time_paired_steady`), and every form against the plain
fp32 graph too (``fp32/plain`` against itself: the noise of the pairing on this machine), the
median over ``--repeats`` pairings reported. Inputs: sentences of Python's help topics,
tokenized to ``--seq`` tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
from torch import nn

from autocompress.compress import LayerPlan, Plan, apply
from autocompress.measure._paired import time_paired_steady
from autocompress.measure._timing import TimingSettings
from autocompress.measure.runtimes._ort import _session_runner
from autocompress.measure.target import Target
from autocompress.onnxgraph import export_onnx, fuse, verify_fused
from autocompress.tasks import load_task


def inputs(seq: int) -> dict[str, torch.Tensor]:
    """One sentence pair of the task's text, ``seq`` tokens (padded or cut)."""
    from autocompress.tasks.minilm import _load_pretrained, sentences

    _, tokenizer = _load_pretrained()
    text = " ".join(sentences(12)[:6] if seq > 64 else sentences(12)[:1])
    t = tokenizer([text], padding="max_length", truncation=True, max_length=seq,
                  return_tensors="pt")
    return {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}


def forms(model: nn.Module, x: dict, tmp: str) -> dict[str, tuple[bytes, str]]:
    """``{name: (onnx bytes, fused-op summary)}`` of the plain and fused forms."""
    from autocompress._inputs import to_numpy_feed

    plain = export_onnx(model, x, f"{tmp}/m.onnx").read_bytes()
    fused = fuse(plain)
    reason = verify_fused(plain, fused.onnx, to_numpy_feed(x))
    if reason:
        print(f"  fused graph does not match: {reason}", file=sys.stderr)
    return {"plain": (plain, ""), "fused": (fused.onnx, fused.summary)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, nargs="+", default=[32, 128])
    p.add_argument("--attn", nargs="+", default=["sdpa", "eager"])
    p.add_argument("--budget", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import tempfile

    from autocompress._inputs import to_numpy_feed

    task = load_task("minilm")
    linears = [n for n, m in task.model.named_modules() if isinstance(m, nn.Linear)]
    settings = TimingSettings(warmup=20, min_runs=60, budget_s=args.budget, min_time_s=1.0)
    target = Target(threads=1)
    rows = []
    for attn in args.attn:
        task.model.encoder.set_attn_implementation(attn)
        for seq in args.seq:
            x = inputs(seq)
            with tempfile.TemporaryDirectory() as tmp:
                fp32 = forms(task.model, x, tmp)
                dyn = apply(task.model, Plan({n: LayerPlan(bits=8, act_bits="dynamic")
                                              for n in linears}), x)
                int8 = forms(dyn, x, tmp)
            feed = to_numpy_feed(x)
            runs = {f"{prec}/{form}": (_session_runner(b, feed, target), ops)
                    for prec, fs in (("fp32", fp32), ("dyn-int8", int8)) for form, (b, ops) in fs.items()}
            base = runs["fp32/plain"][0]

            def speedup(reference, run) -> float:
                return round(statistics.median(time_paired_steady(reference, run, settings).speedup
                                               for _ in range(args.repeats)), 3)

            for name, (run, ops) in runs.items():
                row = {"attn": attn, "seq": seq, "graph": name, "fused_ops": ops,
                       "x_fp32_plain": speedup(base, run)}
                if name.endswith("/fused"):
                    row["x_own_plain"] = speedup(runs[name.replace("fused", "plain")][0], run)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
