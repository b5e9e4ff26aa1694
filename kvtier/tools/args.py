"""The units of kvtier's command lines: argparse value types (token lengths like 16k, depths, counts, milliseconds,
byte budgets), the same units written back for tables and labels, the shared --device / --dtype / --threads options,
the benchmark scripts' --quick / --out, and the versions a run records."""
from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch
import transformers

import kvtier
from kvtier.allocator import SETTINGS
from kvtier.config import parse_bytes
from kvtier.tools.model import preferred_dtype


# ---- argparse value types -------------------------------------------------------------------------------------------
def length(text: str) -> int:
    """'16k' -> 16384, '1m' -> 1048576, '7900' -> 7900 (k = 1024, m = 1024k)."""
    return _checked(text, _tokens, lambda tokens: tokens > 0, "{text!r} is not a length; write e.g. 16k, 1m or 12000",
                    "length must be positive, got {text!r}")


def lengths(text: str) -> list[int]:
    """'8k,32k,1m' -> [8192, 32768, 1048576]."""
    return [length(part) for part in text.split(",") if part.strip()]


def fraction(text: str) -> float:
    """A needle depth in [0, 1]."""
    return _checked(text, float, lambda value: 0.0 <= value <= 1.0, "{text!r} is not a number; write a depth like 0.5",
                    "depth {text} is outside [0, 1]; 0 = start, 1 = end of the filler")


def fractions(text: str) -> list[float]:
    return [fraction(part) for part in text.split(",") if part.strip()]


def positive(text: str) -> int:
    return _checked(text, int, lambda value: value > 0, "{text!r} is not a whole number",
                    "expected a positive number, got {value}")


def milliseconds(text: str) -> float:
    return _checked(text, float, lambda value: value > 0, "{text!r} is not a number of milliseconds",
                    "the sampling interval must be positive, got {text} ms")


def byte_budget(text: str) -> int:
    """'1GiB', '512MB', '4096' -> bytes (kvtier.config.parse_bytes)."""
    try:
        return parse_bytes(text, "budget")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _tokens(text: str) -> int:
    scale = {"k": 1 << 10, "m": 1 << 20}.get(text.strip()[-1:].lower(), 1)
    return int(float(text.strip()[:-1] if scale > 1 else text.strip()) * scale)


def _checked(text: str, convert, valid, unreadable: str, invalid: str):
    """convert(text), when it reads it (else `unreadable`) and the value is valid (else `invalid`); the messages are
    formatted with the text and the value, for argparse to print."""
    try:
        value = convert(text)
    except (ValueError, OverflowError):  # not a number; inf
        raise argparse.ArgumentTypeError(unreadable.format(text=text)) from None
    if not valid(value):
        raise argparse.ArgumentTypeError(invalid.format(text=text, value=value))
    return value


# ---- the same units, written back -----------------------------------------------------------------------------------
def format_length(tokens: int | None) -> str:
    """12288 -> '12K', 1048576 -> '1M', 7900 -> '7900', None -> '-'."""
    if tokens is None:
        return "-"
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if tokens % size == 0:
            return f"{tokens // size}{unit}"
    return str(tokens)


def format_bytes(value: int | None) -> str:
    """Bytes -> '22.45 GiB', '1010 MiB', '3.1 KiB', '0 B'; None -> '-'."""
    if value is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.4g} {unit}"
    return f"{value} B"


# ---- shared options -------------------------------------------------------------------------------------------------
def add_script_options(parser: argparse.ArgumentParser, writes: str, command: str) -> None:
    """--quick and --out, as every benchmarks/ script takes them: `writes` names what --out receives, `command` its
    default folder runs/<command>-<timestamp>."""
    parser.add_argument("--quick", action="store_true",
                        help="a tiny random Llama on the CPU at small scope sizes, in seconds: checks the script (CI)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder for {writes} (default runs/{command}-<timestamp>)")


def add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = cuda when available, else cpu")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                        help="auto = bfloat16 on cuda and on CPUs with native bfloat16 (AMX, AVX512-BF16), "
                             "else float32")
    parser.add_argument("--threads", type=positive, default=None, help="CPU threads for torch (default: torch's)")


def apply_device_options(args: argparse.Namespace, quick: bool = False) -> tuple[torch.device, torch.dtype]:
    """Sets --threads; -> the device and dtype --device and --dtype ask for. `quick` (a --quick run: a tiny model)
    makes auto mean the CPU in float32. ValueError for --device cuda where torch sees no CUDA device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and not quick else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device; use --device cpu (or auto)")
    if args.dtype != "auto":
        dtype = getattr(torch, args.dtype)
    else:
        dtype = torch.float32 if quick else preferred_dtype(device)
    return torch.device(device), dtype


def versions() -> dict[str, str]:
    """What a run's JSON records of the software it ran on, and PyTorch's allocator settings (how host memory is
    pinned changes the host tier's speed: kvtier.allocator)."""
    settings = {name: os.environ[name] for name in SETTINGS if os.environ.get(name)}
    return {"kvtier": kvtier.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), **settings}
