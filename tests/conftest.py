"""Fixtures: tiny random models of every supported family, built from a config (no download)."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
import transformers

# Triton kernels run on the CPU through Triton's interpreter; it must be chosen before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite writes no model cache (540 MB, in ~/.cache by default) unless KVTIER_CACHE_DIR is set: tests of the cache
# point it at their own tmp_path. Set at import, not in a fixture, so scripts that tests run as subprocesses inherit it.
os.environ.setdefault("KVTIER_CACHE_DIR", "off")

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*", category=FutureWarning)


def tiny_config(family: str, window: int = 2048, **overrides):
    common = dict(
        vocab_size=128,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=window,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "mistral":
        return transformers.MistralConfig(sliding_window=None, head_dim=16, **common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "qwen3":
        return transformers.Qwen3Config(head_dim=16, **common)
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    return model.eval()


def random_ids(length: int, batch: int = 1, seed: int = 1, vocab: int = 128) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def greedy(model, ids, cache=None, new_tokens: int = 24, **kwargs) -> torch.Tensor:
    extra = {"past_key_values": cache} if cache is not None else {}
    with torch.inference_mode():
        return model.generate(
            ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens, **extra, **kwargs
        )[:, ids.shape[1] :]


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny tensors: on a 2-core runner the thread pool makes each small bmm ~40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
