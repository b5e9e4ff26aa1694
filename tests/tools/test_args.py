"""The command line's value types (kvtier.tools.args): what each accepts, what it refuses and how it says so, and the
same units written back."""
from __future__ import annotations

import argparse

import pytest
import torch

from kvtier.tools.args import (apply_device_options, byte_budget, format_bytes, format_length, fraction, fractions,
                               length, lengths, milliseconds, positive, versions)


@pytest.mark.parametrize("text, tokens", [("16k", 16384), ("16K", 16384), ("1m", 1 << 20), ("7900", 7900),
                                          ("1.5k", 1536), (" 2k ", 2048)])
def test_a_length_takes_k_and_m_suffixes(text, tokens):
    assert length(text) == tokens


@pytest.mark.parametrize("text, message", [("lots", "is not a length; write e.g. 16k"), ("k", "is not a length"),
                                           ("0", "must be positive"), ("-1k", "must be positive")])
def test_a_bad_length_names_the_fix(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        length(text)


def test_lists_skip_empty_items():
    assert lengths("8k, 32k,1m,") == [8192, 32768, 1 << 20]
    assert fractions("0,0.5, 1") == [0.0, 0.5, 1.0]
    assert lengths(",") == []


@pytest.mark.parametrize("text, message", [("1.5", r"outside \[0, 1\]"), ("-0.1", "outside"), ("half", "depth like")])
def test_a_depth_is_a_fraction(text, message):
    assert fraction("0.25") == 0.25
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        fraction(text)


@pytest.mark.parametrize("text, message", [("0", "positive"), ("-2", "positive"), ("two", "whole number"),
                                           ("1.5", "whole number")])
def test_a_count_is_a_positive_whole_number(text, message):
    assert positive("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        positive(text)


@pytest.mark.parametrize("text, message", [("0", "must be positive"), ("-5", "must be positive"),
                                           ("soon", "not a number of milliseconds")])
def test_an_interval_is_positive_milliseconds(text, message):
    assert milliseconds("20") == 20.0 and milliseconds("0.5") == 0.5
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        milliseconds(text)


def test_a_budget_is_bytes_whatever_its_unit():
    assert byte_budget("1GiB") == 1 << 30
    assert byte_budget("512KiB") == 512 << 10
    assert byte_budget("2GB") == 2 * 10**9
    assert byte_budget("4096") == 4096
    for text, message in (("huge", "is not a size"), ("0", "must be positive")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            byte_budget(text)


def test_lengths_and_bytes_are_written_back_in_their_units():
    assert [format_length(length(text)) for text in ("16k", "1m", "7900", "1.5k")] == ["16K", "1M", "7900", "1536"]
    assert format_length(None) == "-"
    assert [format_bytes(n) for n in (3 << 30, 1010 << 20, 3174, 0, None)] == [
        "3 GiB", "1010 MiB", "3.1 KiB", "0 B", "-"]


def test_quick_runs_default_to_the_cpu_in_float32():
    options = argparse.Namespace(device="auto", dtype="auto", threads=None)
    assert apply_device_options(options, quick=True) == (torch.device("cpu"), torch.float32)
    options.dtype = "bfloat16"
    assert apply_device_options(options, quick=True) == (torch.device("cpu"), torch.bfloat16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine cannot show the refusal of --device cuda without one; this runs on every CPU-only machine (CI)")
def test_cuda_without_a_device_is_refused():
    with pytest.raises(ValueError, match="no CUDA device"):
        apply_device_options(argparse.Namespace(device="cuda", dtype="auto", threads=None))


def test_a_run_records_its_versions_and_the_allocator_settings_that_pin_host_memory(monkeypatch):
    # (importing the `kvtier` command sets PYTORCH_CUDA_ALLOC_CONF in this process: kvtier.allocator)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert set(versions()) == {"kvtier", "torch", "transformers", "python"}
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "pinned_use_cuda_host_register:True")
    assert versions()["PYTORCH_CUDA_ALLOC_CONF"] == "pinned_use_cuda_host_register:True"
