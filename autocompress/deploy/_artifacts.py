"""The built-in export formats (:mod:`~autocompress.deploy._export_formats`):

- ``onnx``: ``model.onnx`` from :func:`autocompress.compress.export_onnx` (int8 weights +
  DequantizeLinear, BatchNorm folded), loaded by a plain ``onnxruntime.InferenceSession``;
- ``torchscript``: ``model.pt``, ``torch.jit.trace`` of the baked model, loaded by
  ``torch.jit.load``;
- ``packed``: ``model.acpk`` (:mod:`autocompress.deploy._packed`), loaded by
  ``autocompress.load_packed``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autocompress.deploy._export_formats import EXPORT_FORMATS, ExportFormat
from autocompress.deploy._rebuild import Rebuilt


class _OnnxModule(nn.Module):
    """An ONNX Runtime session behind an ``nn.Module`` interface, so the task's own metric
    function can evaluate the exported file (a decoder LM's graph with its KV cache: whole
    sequences on an empty cache, the logits out)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.causal = any(name.startswith("past_key_values.") for name in self.inputs)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        """Called as the task calls its model (``model(x)``, ``model(*x)``, ``model(**x)``);
        the ONNX inputs are named as :func:`autocompress._inputs.input_names` names them (an
        input the exporter dropped, e.g. an unused mask, is left out of the feed)."""
        from autocompress._inputs import to_numpy_feed

        inputs = kwargs or (args[0] if len(args) == 1 else args)
        feed = {k: v for k, v in to_numpy_feed(inputs).items() if k in self.inputs}
        if self.causal:
            from autocompress.onnxgraph import prefill_feed

            graph = [(i.name, i.shape) for i in self.session.get_inputs()]
            feed = prefill_feed(graph, feed["input_ids"], feed.get("attention_mask"))
        return torch.from_numpy(self.session.run(None, feed)[0])


def _write_onnx(rebuilt: Rebuilt, path: Path) -> None:
    from autocompress.onnxgraph import export_causal_lm, export_onnx, is_causal_lm

    if is_causal_lm(rebuilt.model):  # the deployable decoder: its KV cache in and out
        export_causal_lm(rebuilt.model, rebuilt.task.example_inputs, path)
        return
    export_onnx(rebuilt.model, rebuilt.task.example_inputs, path,
                calibration=rebuilt.task.calibration_batches())


def _save_onnx(loaded: nn.Module, path: Path, local: Path, signature: Any, rebuilt: Rebuilt) -> None:
    import mlflow
    import onnx
    import onnxruntime

    providers = ["CPUExecutionProvider"]
    if rebuilt.target.device == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
    mlflow.onnx.save_model(onnx.load(str(path)), str(local), signature=signature,
                           save_as_external_data=False, onnx_execution_providers=providers,
                           pip_requirements=[f"onnx=={onnx.__version__}",
                                             f"onnxruntime=={onnxruntime.__version__}"])


def _write_torchscript(rebuilt: Rebuilt, path: Path) -> None:
    from autocompress._inputs import trace_arguments
    from autocompress.compress import bake

    with warnings.catch_warnings():  # deprecation notice; tracer notes on frozen act ranges
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(bake(rebuilt.model), **trace_arguments(rebuilt.task.example_inputs))
        torch.jit.save(traced, str(path))


def _load_torchscript(path: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path)).eval()


def _save_torch(loaded: nn.Module, path: Path, local: Path, signature: Any, rebuilt: Rebuilt,
                packed: bool = False) -> None:
    """The ``pytorch`` flavour of the loaded module; a packed file goes along as an extra file
    (and autocompress, which loads it, into the requirements)."""
    import mlflow

    import autocompress

    reqs = [f"torch=={torch.__version__.split('+')[0]}"]
    if packed:
        reqs.append(f"autocompress=={autocompress.__version__}")
    # "pickle": MLflow's "pt2" default refuses TorchScript and needs an input example.
    mlflow.pytorch.save_model(loaded, str(local), signature=signature, pip_requirements=reqs,
                              serialization_format="pickle",
                              extra_files=[str(path)] if packed else None)


def _write_packed(rebuilt: Rebuilt, path: Path) -> None:
    from autocompress.deploy._packed import save_packed

    save_packed(rebuilt.model, path)


def _load_packed(path: Path) -> nn.Module:
    from autocompress.deploy._packed import load_packed

    return load_packed(path)


def _save_packed(loaded: nn.Module, path: Path, local: Path, signature: Any, rebuilt: Rebuilt) -> None:
    _save_torch(loaded, path, local, signature, rebuilt, packed=True)


EXPORT_FORMATS.register("onnx", ExportFormat(
    "onnx", "model.onnx", "onnxruntime", _write_onnx, _OnnxModule, _save_onnx, times_model=True))
EXPORT_FORMATS.register("torchscript", ExportFormat(
    "torchscript", "model.pt", "torch", _write_torchscript, _load_torchscript, _save_torch))
EXPORT_FORMATS.register("packed", ExportFormat(
    "packed", "model.acpk", "torch", _write_packed, _load_packed, _save_packed))
