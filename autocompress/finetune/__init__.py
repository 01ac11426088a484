"""Fine-tuning a compressed model, optionally distilling from the uncompressed one.

The settings (:class:`FinetuneConfig`, ``_config.py``) are torch-free, so reading an
experiment file does not import torch; the loop (``_loop.py``), the distillation losses
(``_losses.py``) and the learning rate (``_lr.py``: schedule, optimizer, ``lr: auto``) import
it when first used.
"""

from autocompress._lazy import lazy_exports

_EXPORTS = {
    "_config": ("AUTO", "DEFAULT_LR", "DEVICES", "DISTILL_LOSSES", "LR_CANDIDATES", "OPTIMIZERS",
                "SCHEDULES", "FinetuneConfig"),
    "_loop": ("DivergedError", "TrainingStopped", "evaluate", "finetune", "resolve_device",
              "snapshot"),
    "_losses": ("distill_loss_name", "output_tensor"),
    "_lr": ("LrChoice", "choose_lr"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
