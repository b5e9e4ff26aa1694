"""The process tests/tiers/test_crash.py kills: it prefills a tiny model's cache step by step (spilling to LMDB) and saves
it to one path after every step.

It is a small fork server, so that the seconds of importing torch and transformers are paid once, not per trial. It
reads commands on stdin, one per line:

  run <path> <spill_dir> <seed>   fork a child that repeats, for each save point t of `save_points()`:
                                  "prefill t"  - feed the ids up to t (the tiny budgets make it spill to LMDB)
                                  "saving t d" - d spans are on disk now (spilled); cache.save(path) begins
                                  "saved t"    - cache.save(path) returned
                                  and prints "start <pid>" first and "done" after the last save point
  probe <path>                    fork a child that loads <path> and reads every span back; it prints
                                  "probe ok <tokens>" or "probe <ExceptionName>"

After each child ended (finished or killed), the server prints "ended <pid> <wait status>". Children print their
lines (flushed) on the server's stdout, so the test reads everything a child printed before "ended".
The test also imports this module for what the worker does (`build_model`, `worker_ids`, `prefill`, ...), so that
its uninterrupted in-process runs feed exactly the same forwards.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch

from kvtier.cache import ReAttentionCache
from tests.conftest import random_ids, tiny_model

TINY = dict(global_size=4, local_size=24, span_size=4, top_k=3, chunk_size=12)
BATCH = 2
SPAN_BYTES = 2 * 2 * 4 * 16 * 4
# one step needs BATCH * (top_k + chunk/span + seal_group - 1) = 18 spans in each tier; a little more keeps both tiers
# spilling
BUDGETS = dict(gpu_budget=20 * SPAN_BYTES, host_budget=22 * SPAN_BYTES)
FIRST, STEP, STEPS = 48, 36, 60  # 4 spans sealed by the first save (a group of 4)


def save_points() -> list[int]:
    """Token counts the worker saves at: FIRST, FIRST + STEP, ..."""
    return [FIRST + STEP * k for k in range(STEPS)]


def worker_ids(seed: int) -> torch.Tensor:
    return random_ids(save_points()[-1] + 1, batch=BATCH, seed=seed)


def build_model():
    return tiny_model("llama")


def prefill(model, cache, ids: torch.Tensor, start: int, stop: int) -> None:
    """Feed ids[:, start:stop] in one forward (the worker's pieces; chunk boundaries must match for equal results)."""
    with torch.inference_mode():
        model(ids[:, start:stop], past_key_values=cache, use_cache=True)


def all_spans(cache) -> torch.Tensor:
    """Every span of a cache, read back from wherever it lives (disk records are checksum-verified)."""
    return cache.placement.read_spans(np.arange(cache.placement.uids))


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _run(path: str, spill_dir: str, seed: int) -> None:
    _say(f"start {os.getpid()}")
    model = build_model()
    ids = worker_ids(seed)
    cache = ReAttentionCache(model, **TINY, **BUDGETS, disk_path=spill_dir)
    fed = 0
    for point in save_points():
        _say(f"prefill {point}")
        prefill(model, cache, ids, fed, point)
        fed = point
        _say(f"saving {point} {cache.stats()['spans']['disk']}")
        cache.save(path)
        _say(f"saved {point}")
    _say("done")


def _probe(path: str) -> None:
    try:
        cache = ReAttentionCache.load(path, build_model())
        all_spans(cache)
        _say(f"probe ok {cache.get_seq_length()}")
    except Exception as err:  # the test checks which error; anything but a crash of the interpreter is reported
        _say(f"probe {type(err).__name__}")


def _child(command: list[str]) -> None:
    try:
        if command[0] == "run":
            _run(command[1], command[2], int(command[3]))
        else:
            _probe(command[1])
    except BaseException as err:
        _say(f"error {type(err).__name__}: {err}")
        os._exit(1)
    os._exit(0)


def serve() -> None:
    for line in sys.stdin:
        command = line.split()
        if not command:
            continue
        if command[0] not in ("run", "probe"):
            _say(f"error unknown command {line.strip()!r}")
            continue
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _child(command)
        _, status = os.waitpid(pid, 0)
        _say(f"ended {pid} {status}")


if __name__ == "__main__":
    serve()
