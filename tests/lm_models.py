"""Tiny random-init Hugging Face decoder LMs (built locally, nothing downloaded) and a tiny
decoder task for the tests.

``tiny_lm_task`` is also a user task reference: ``"tests.lm_models:tiny_lm_task"``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from autocompress.tasks import Task

VOCAB = 96
MAX_POSITIONS = 64


class CharTokenizer:
    """Characters as token ids (modulo the vocabulary): the tokenizer interface the task uses."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % VOCAB for c in text]}


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True))


def _qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS))


def _mistral() -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                      n_positions=MAX_POSITIONS))


LMS: dict[str, Callable[[], nn.Module]] = {
    "llama": _llama, "qwen2": _qwen2, "mistral": _mistral, "gpt2": _gpt2}


def tiny_lm(family: str = "llama", seed: int = 0) -> nn.Module:
    """A random-init Hugging Face causal LM of ``family`` (2 layers, hidden 32), in eval mode."""
    torch.manual_seed(seed)
    return LMS[family]().eval()


def texts() -> list[str]:
    """Python's help topics: text that is not random, so the metrics are not constant."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:6]]


def tiny_lm_task(family: str = "llama", seq_len: int = 32) -> Task:
    """The next-token task of a tiny random-init ``family`` model on a few help topics."""
    from autocompress.tasks.causal_lm import causal_lm_task

    return causal_lm_task(tiny_lm(family), CharTokenizer(), texts(), seq_len=seq_len,
                          name=f"tiny-{family}", train_samples=32, val_samples=8, batch_size=4)
