"""Pick and deploy: rebuild a trial from MLflow, export it (ONNX, TorchScript, packed) with
verification, register it, and report on a search."""

from autocompress._lazy import lazy_exports

_EXPORTS = {
    "_rebuild": ("Rebuilt", "rebuild_from_run"),
    "_export": ("export_run", "VerificationError"),
    "_export_formats": ("DEFAULT_TOLERANCE", "EXPORT_FORMATS", "FORMATS", "ExportFormat"),
    "_packed": ("save_packed", "load_packed"),
    "_report": ("write_report",),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
