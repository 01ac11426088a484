"""Pick and deploy: rebuild a trial from MLflow, export it (ONNX, TorchScript, packed) with
verification, register it, and report on a search."""

from autocompress._lazy import lazy_exports

_WHERE = {
    "Rebuilt": "autocompress.deploy._rebuild",
    "rebuild_from_run": "autocompress.deploy._rebuild",
    "export_run": "autocompress.deploy._export",
    "VerificationError": "autocompress.deploy._export",
    "FORMATS": "autocompress.deploy._export",
    "save_packed": "autocompress.deploy._packed",
    "load_packed": "autocompress.deploy._packed",
    "write_report": "autocompress.deploy._report",
}
__all__ = list(_WHERE)

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
