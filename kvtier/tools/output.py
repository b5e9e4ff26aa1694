"""What every command leaves: its --out folder (runs/<command>-<date>-<time> unless given), JSON files replaced whole,
its last lines - each file it wrote, then its table - and, stopped by SIGTERM, no spill files."""
from __future__ import annotations

import json
import os
import signal
import threading
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable


def default_out(command: str) -> Path:
    """Where a run writes when --out is not given: runs/<command>-<date>-<time>."""
    return Path("runs") / f"{command}-{datetime.now():%Y%m%d-%H%M%S}"


def write_json(path: str | Path, doc: Any, indent: int = 1) -> Path:
    """`doc` as JSON at `path` (its folder made), replaced whole: written beside it, then renamed over it, so a run
    killed mid-write leaves the previous version, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(doc, indent=indent, default=str) + "\n")
    os.replace(partial, path)
    return path


def print_report(paths: Iterable[Path], table: str) -> None:
    """'wrote PATH' for each file written, then the table: what a command prints last."""
    for path in paths:
        print(f"wrote {path}")
    print("\n" + table)


def unwind_on_sigterm() -> None:
    """`timeout`, job schedulers and `kill` stop a run with SIGTERM, which ends Python at once by default: finally
    blocks and finalizers would not run and a cut run would leave its LMDB spill files (tens of GiB at 1M tokens)
    behind. Raising SystemExit instead unwinds the run: spill files are removed, results saved so far stay whole."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
