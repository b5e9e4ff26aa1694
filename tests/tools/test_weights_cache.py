"""The cache of the de-quantised model: written once, read back with the same logits, rebuilt when damaged, never
half-written. The real model is loaded from its GGUF file once (~30 s); the other tests stand a tiny model in for it."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

import kvtier.tools.model
from kvtier.tools.model import (CACHE_DIR_ENV, GGUF_NAME, MODEL_DIR_ENV, ModelNotInstalledError, find_gguf, load_smollm2,
                          model_cache_folder)
from tests.conftest import tiny_model

IDS = torch.tensor([[5, 17, 3, 99, 42, 8]])


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """KVTIER_CACHE_DIR for one test, removed after it (the real model's cache is 540 MB)."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    yield tmp_path / "cache"
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


def _gguf_must_not_load(gguf_file):
    raise AssertionError(f"loaded {gguf_file} instead of the cache")


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits


@pytest.mark.real_model
def test_real_model_is_read_back_from_its_cache_with_the_same_logits(cache_dir, monkeypatch, capsys):
    monkeypatch.delenv(MODEL_DIR_ENV, raising=False)
    try:
        gguf_model, gguf_tokenizer = load_smollm2()
    except ModelNotInstalledError as err:
        pytest.skip(f"the real model is not installed here: {err}")
    folder = model_cache_folder(find_gguf())
    assert list(cache_dir.iterdir()) == [folder]  # complete, and no staging folder left beside it
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {file.name for file in folder.iterdir()}
    assert f"MB) in {folder}" in capsys.readouterr().err

    monkeypatch.setattr(kvtier.tools.model, "_load_gguf", _gguf_must_not_load)
    model, tokenizer = load_smollm2()
    prompt = "The capital of France is"
    assert tokenizer(prompt).input_ids == gguf_tokenizer(prompt).input_ids
    assert tokenizer.chat_template == gguf_tokenizer.chat_template and tokenizer.eos_token == gguf_tokenizer.eos_token
    ids = torch.tensor([gguf_tokenizer(prompt).input_ids])
    assert torch.equal(logits(model, ids), logits(gguf_model, ids))
    # A bfloat16 load from the GGUF file casts its float32 de-quantised model (loading it again would take ~30 s).
    kvtier.tools.model._cast_weights(gguf_model, torch.bfloat16)
    model, _ = load_smollm2(dtype=torch.bfloat16)
    assert model.dtype == gguf_model.dtype == torch.bfloat16
    assert torch.equal(logits(model, ids), logits(gguf_model, ids))


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1, "cat": 2, "sat": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


@pytest.fixture
def stand_in(tmp_path, cache_dir, monkeypatch):
    """A stand-in GGUF file whose loading gives a tiny model; returns the list of files loaded that way."""
    gguf = tmp_path / "model" / GGUF_NAME
    gguf.parent.mkdir()
    gguf.write_bytes(b"stand-in")
    monkeypatch.setenv(MODEL_DIR_ENV, str(gguf.parent))
    loaded = []

    def load_gguf(gguf_file):
        loaded.append(gguf_file)
        return tiny_model(), tiny_tokenizer()

    monkeypatch.setattr(kvtier.tools.model, "_load_gguf", load_gguf)
    return loaded


def cache_entries() -> list[str]:
    folder = model_cache_folder(find_gguf())
    return sorted(path.name for path in folder.parent.iterdir()) if folder.parent.is_dir() else []


def test_a_damaged_cache_is_rebuilt_from_the_gguf_with_a_warning(stand_in, monkeypatch):
    load_smollm2()
    folder = model_cache_folder(find_gguf())
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.warns(UserWarning, match="unreadable"):
        model, tokenizer = load_smollm2()
    assert len(stand_in) == 2 and torch.equal(logits(model), logits(tiny_model()))

    monkeypatch.setattr(kvtier.tools.model, "_load_gguf", _gguf_must_not_load)
    model, tokenizer = load_smollm2()  # the rebuilt cache
    assert torch.equal(logits(model), logits(tiny_model())) and tokenizer("the cat sat").input_ids == [1, 2, 3]
    assert cache_entries() == [folder.name]


@pytest.mark.parametrize("switch", ["environment", "argument"])
def test_a_disabled_cache_writes_nothing(stand_in, cache_dir, monkeypatch, switch):
    if switch == "environment":
        monkeypatch.setenv(CACHE_DIR_ENV, "off")
        assert model_cache_folder(find_gguf()) is None
    for _ in range(2):
        load_smollm2(cache=switch != "argument")
    assert len(stand_in) == 2 and not cache_dir.exists()


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError])
def test_a_write_stopped_midway_leaves_no_cache(stand_in, monkeypatch, failure):
    folder = model_cache_folder(find_gguf())
    save = LlamaForCausalLM.save_pretrained
    on_disk_at_failure = []

    def save_half_then_fail(model, staging, **kwargs):
        save(model, staging, **kwargs)
        weights = Path(staging) / "model.safetensors"
        os.truncate(weights, weights.stat().st_size // 2)
        on_disk_at_failure.extend(path.name for path in folder.parent.iterdir())
        raise failure("stopped midway")

    with monkeypatch.context() as patch:
        patch.setattr(LlamaForCausalLM, "save_pretrained", save_half_then_fail)
        if failure is KeyboardInterrupt:
            with pytest.raises(KeyboardInterrupt):
                load_smollm2()
        else:
            with pytest.warns(UserWarning, match="could not cache"):
                load_smollm2()  # the load itself succeeds
    # What a crash at that point leaves: one hidden staging folder, not the folder loads read.
    assert len(on_disk_at_failure) == 1 and on_disk_at_failure[0].startswith(f".{folder.name}.")
    assert cache_entries() == []  # and the staging folder is removed on the way out

    load_smollm2()  # the next load writes the cache
    assert len(stand_in) == 2 and cache_entries() == [folder.name]


def test_a_cache_another_process_put_in_place_first_is_kept(stand_in, monkeypatch):
    folder = model_cache_folder(find_gguf())
    save = LlamaForCausalLM.save_pretrained

    def save_while_another_process_finishes_first(model, staging, **kwargs):
        save(model, staging, **kwargs)
        save(tiny_model(seed=1), folder)
        tiny_tokenizer().save_pretrained(folder)

    with monkeypatch.context() as patch:
        patch.setattr(LlamaForCausalLM, "save_pretrained", save_while_another_process_finishes_first)
        model, _ = load_smollm2()
    assert torch.equal(logits(model), logits(tiny_model()))  # this load returns its own model,
    assert cache_entries() == [folder.name]  # removes its copy, keeps theirs

    monkeypatch.setattr(kvtier.tools.model, "_load_gguf", _gguf_must_not_load)
    model, _ = load_smollm2()
    assert torch.equal(logits(model), logits(tiny_model(seed=1)))


def test_the_cache_folder_changes_with_the_gguf_file_and_transformers(stand_in, cache_dir, tmp_path, monkeypatch):
    gguf = find_gguf()
    folder = model_cache_folder(gguf)
    version = ".".join(transformers.__version__.split(".")[:2])
    assert folder.parent == cache_dir and folder.name.startswith(f"{gguf.stem}-")
    assert folder.name.endswith(f"-transformers{version}")
    mtime = gguf.stat().st_mtime_ns
    os.utime(gguf, ns=(mtime, mtime + 1))
    assert model_cache_folder(gguf) != folder
    gguf.write_bytes(b"stand-in, rewritten")
    os.utime(gguf, ns=(mtime, mtime))
    assert model_cache_folder(gguf) != folder
    gguf.write_bytes(b"stand-in")
    os.utime(gguf, ns=(mtime, mtime))
    assert model_cache_folder(gguf) == folder
    monkeypatch.setattr("transformers.__version__", "5.999.0")
    assert model_cache_folder(gguf) != folder

    monkeypatch.delenv(CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_cache_folder(gguf).parent == tmp_path / "xdg" / "kvtier"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_cache_folder(gguf).parent == tmp_path / "home" / ".cache" / "kvtier"
