"""Crash safety of cache.save: a process that prefills, spills and saves over and over is killed with SIGKILL at random
moments (before its first save completes, inside saves, inside prefills that spill to LMDB). After every kill the
path holds either nothing (only if no save had completed) or a complete, consistent cache: one of the states the
worker reached, record for record what a clean save of that state writes, and it continues as an uninterrupted run.

The kill moments come from a seeded RNG; set KVTIER_CRASH_SEED to replay another sequence (the timing of the worker
still varies from run to run, so a replay lands near, not exactly at, the same instants).
"""
from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from kvtier import ReAttentionCache
from kvtier.errors import CacheFileNotFoundError
from tests.tiers import crash_worker as worker
from tests.conftest import greedy
from tests.tiers.persist_worker import read_records

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("KVTIER_CRASH_SEED", "20250611"))
IDS_SEED = 5
TRIALS = 30
CONTINUED = 4  # the first trials that find a cache also continue generation (against an uninterrupted run)
NEW_TOKENS = 8
TIMEOUT_S = 60.0
# where a trial aims its kill: (the worker line it waits for, which save points that line may name)
AIMS = {
    "before the first save": ("start", [None]),
    "inside a save": ("saving", worker.save_points()[1:7]),
    "inside a spilling prefill": ("prefill", worker.save_points()[2:7]),
}


class Worker:
    """tests/crash_worker.py as a fork server, with its stdout read line by line under a deadline."""

    def __init__(self, stderr: Path):
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE")
        self.stderr = stderr
        with open(stderr, "wb") as errors:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "tiers" / "crash_worker.py")],
                cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, bufsize=0,
            )
        self._buffer = b""
        self.child: int | None = None  # the running child's pid, between its "start" line and the server's "ended"

    def send(self, command: str) -> None:
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def line(self, deadline: float) -> tuple[float, list[str]]:
        """The next line the server or its child printed -> (when it was read, its words)."""
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(deadline - time.monotonic(), 0))
            chunk = os.read(self.proc.stdout.fileno(), 65536) if ready else b""
            if not chunk:
                raise AssertionError(f"the crash worker printed nothing more (exit status {self.proc.poll()}); its "
                                     f"stderr ends: {self.stderr.read_text(errors='replace')[-3000:]}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        words = line.decode().split()
        if words[:1] == ["start"]:
            self.child = int(words[1])
        elif words[:1] == ["ended"]:
            self.child = None
        return time.monotonic(), words

    def close(self) -> None:
        if self.child is not None:  # a test that failed mid-trial leaves its child running
            os.kill(self.child, signal.SIGKILL)
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@dataclass
class Trial:
    index: int
    aim: str
    trigger: tuple[str, int | None]
    fraction: float  # of the expected length of the aimed-at phase, slept before the kill
    path: Path
    lines: list[tuple[float, list[str]]] = field(default_factory=list)
    status: int | None = None
    outcome: str = ""
    loaded_tokens: int | None = None

    @property
    def reported(self) -> list[int]:
        """Token counts of the saves the worker reported complete."""
        return [int(words[1]) for _, words in self.lines if words[0] == "saved"]

    @property
    def last(self) -> list[str]:
        """The worker's last progress line before it died."""
        return [words for _, words in self.lines if words[0] in ("start", "prefill", "saving", "saved")][-1]

    @property
    def in_flight(self) -> int | None:
        """The save the worker was inside when killed, if it was inside one."""
        return int(self.last[1]) if self.last[0] == "saving" else None

    @property
    def killed_in(self) -> str:
        if not self.reported:
            return "before the first save"
        return {"saving": "inside a save", "prefill": "inside a spilling prefill"}.get(self.last[0], "between steps")

    def describe(self) -> str:
        return (f"trial {self.index} (KVTIER_CRASH_SEED={SEED}, aimed {self.aim} at {self.trigger}, "
                f"fraction {self.fraction:.2f}): worker said {[' '.join(w) for _, w in self.lines][-4:]}")


class Durations:
    """How long each phase of the worker took in earlier trials: (line, save point) -> seconds to the next line."""

    def __init__(self):
        self.seen: dict[tuple[str, int | None], float] = {}

    def learn(self, trial: Trial) -> None:
        progress = [(t, words) for t, words in trial.lines if words[0] in ("start", "prefill", "saving", "saved")]
        for (start, words), (end, _) in zip(progress, progress[1:]):
            self.seen[self._key(words)] = end - start
        if len(trial.reported) and progress[0][1][0] == "start":
            first_saved = next(t for t, words in progress if words[0] == "saved")
            self.seen[("start", None)] = first_saved - progress[0][0]  # start -> first save complete

    @staticmethod
    def _key(words: list[str]) -> tuple[str, int | None]:
        return words[0], int(words[1]) if words[0] in ("prefill", "saving", "saved") else None

    def expected(self, trigger: tuple[str, int | None]) -> float:
        if trigger in self.seen:
            return self.seen[trigger]
        same_phase = [seconds for (phase, _), seconds in self.seen.items() if phase == trigger[0]]
        return max(same_phase) if same_phase else 0.05


def _run_trial(server: Worker, trial: Trial, durations: Durations, spill: Path) -> None:
    """Start a worker child, wait for the aimed-at line, sleep, SIGKILL it, collect everything it printed."""
    deadline = time.monotonic() + TIMEOUT_S
    server.send(f"run {trial.path} {spill} {IDS_SEED}")
    while True:
        when, words = server.line(deadline)
        trial.lines.append((when, words))
        assert words[0] not in ("error", "done", "ended"), trial.describe()
        if Durations._key(words) == trial.trigger:
            break
    time.sleep(trial.fraction * durations.expected(trial.trigger))
    os.kill(server.child, signal.SIGKILL)
    while True:
        when, words = server.line(deadline)
        if words[0] == "ended":
            trial.status = int(words[2])
            break
        trial.lines.append((when, words))
    assert os.WIFSIGNALED(trial.status) and os.WTERMSIG(trial.status) == signal.SIGKILL, trial.describe()
    durations.learn(trial)


def _probe(server: Worker, path: Path) -> str:
    """Load `path` in a child of the worker -> its verdict ("ok <tokens>" or an exception name)."""
    server.send(f"probe {path}")
    deadline = time.monotonic() + TIMEOUT_S
    verdict = None
    while True:
        _, words = server.line(deadline)
        if words[0] == "probe":
            verdict = " ".join(words[1:])
        if words[0] == "ended":
            assert int(words[2]) == 0, f"loading {path} crashed the interpreter (wait status {words[2]})"
            return verdict


class Reference:
    """The worker's run, uninterrupted and in this process: a clean save at each save point, for comparison. Its
    budgets are the worker's, so its forwards take the same paths (a bounded GPU pool gathers and attends chunk by
    chunk; an unbounded one all chunks at once, equal only to rounding)."""

    def __init__(self, model, folder: Path):
        self.model, self.folder = model, folder
        self.ids = worker.worker_ids(IDS_SEED)
        self.cache = ReAttentionCache(model, **worker.TINY, **worker.BUDGETS, disk_path=str(folder / "reference-spill"))
        self.fed = 0
        self.records: dict[int, dict[bytes, bytes]] = {}

    def records_at(self, tokens: int) -> dict[bytes, bytes]:
        for point in worker.save_points():
            if point > tokens or point in self.records:
                continue
            worker.prefill(self.model, self.cache, self.ids, self.fed, point)
            self.fed = point
            path = self.folder / f"reference-{point}.lmdb"
            self.cache.save(path)
            self.records[point] = read_records(path)
        return self.records[tokens]

    def continuation(self, tokens: int) -> list:
        """What an uninterrupted run that fed the worker's pieces up to `tokens` generates next."""
        cache, fed = ReAttentionCache(self.model, **worker.TINY), 0
        for point in [p for p in worker.save_points() if p <= tokens]:
            worker.prefill(self.model, cache, self.ids, fed, point)
            fed = point
        return greedy(self.model, self.ids[:, : tokens + 1], cache, new_tokens=NEW_TOKENS).tolist()


def _check_path(trial: Trial, model, reference: Reference, continue_it: bool) -> None:
    """What a killed worker left at its path: nothing (only before any reported save) or a consistent cache."""
    allowed = set(trial.reported[-1:]) | ({trial.in_flight} if trial.in_flight is not None else set())
    try:
        cache = ReAttentionCache.load(trial.path, model)
    except CacheFileNotFoundError:
        assert not trial.reported, f"a reported save is gone: {trial.describe()}"
        trial.outcome = "nothing saved yet"
        return
    try:
        tokens = trial.loaded_tokens = cache.get_seq_length()
        assert tokens in allowed, f"loaded {tokens} tokens, allowed {sorted(allowed)}: {trial.describe()}"
        trial.outcome = "the save in flight" if tokens == trial.in_flight else "the last reported save"
        assert torch.equal(cache.token_ids, reference.ids[:, :tokens]), trial.describe()
        spans = worker.all_spans(cache)  # every record read back, checksums verified
        assert spans.shape[0] == cache.stats()["spans"]["disk"] > 0, trial.describe()
        if continue_it:
            continued = greedy(model, reference.ids[:, : tokens + 1], cache, new_tokens=NEW_TOKENS).tolist()
            assert continued == reference.continuation(tokens), trial.describe()
    finally:
        cache.close()
    assert read_records(trial.path) == reference.records_at(tokens), f"differs from a clean save: {trial.describe()}"


def _summary(trials: list[Trial], partials: Counter) -> str:
    outcomes = Counter(trial.outcome for trial in trials)
    places = Counter(trial.killed_in for trial in trials)
    return (f"crash trials: {len(trials)} (seed {SEED}); killed: "
            + ", ".join(f"{count} {place}" for place, count in sorted(places.items()))
            + "; found: " + ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items()))
            + "; leftover .partial files: " + (", ".join(f"{n} {v}" for v, n in sorted(partials.items())) or "none"))


@pytest.fixture
def server(tmp_path):
    server = Worker(tmp_path / "worker-stderr.txt")
    yield server
    server.close()


def test_a_save_killed_at_any_moment_leaves_the_previous_cache_or_none(server, tmp_path, record_property):
    model = worker.build_model()
    reference = Reference(model, tmp_path / "reference")
    reference.folder.mkdir()
    rng = random.Random(SEED)
    durations = Durations()
    trials, partials = [], Counter()
    aims = list(AIMS)
    for index in range(TRIALS):
        aim = aims[index % len(aims)]
        phase, points = AIMS[aim]
        folder = tmp_path / f"trial-{index}"
        folder.mkdir()
        trial = Trial(index, aim, (phase, rng.choice(points)), rng.random(), folder / "ctx.lmdb")
        _run_trial(server, trial, durations, folder / "spill")
        loaded_before = sum(earlier.loaded_tokens is not None for earlier in trials)
        _check_path(trial, model, reference, continue_it=loaded_before < CONTINUED)
        partial = trial.path.with_name(trial.path.name + ".partial")
        if partial.exists():
            verdict = _probe(server, partial)
            assert verdict == "CorruptCacheError" or verdict == f"ok {trial.in_flight}", (
                f"{partial} loaded as {verdict!r}: {trial.describe()}")
            partials[verdict.split()[0]] += 1
        trials.append(trial)

    summary = _summary(trials, partials)
    record_property("crash_summary", summary)
    print(summary)
    assert len(trials) == TRIALS, summary
    assert all(trial.outcome for trial in trials), summary
    killed = Counter(trial.killed_in for trial in trials)
    for place in AIMS:
        assert killed[place] > 0, f"no kill landed {place}: {summary}"
    spilled = [int(words[2]) for trial in trials for _, words in trial.lines if words[0] == "saving"]
    assert max(spilled) > 0, f"the worker never spilled to LMDB: {summary}"
    assert sum(partials.values()) > 0, f"no kill left a .partial file to probe: {summary}"
    assert sum(trial.loaded_tokens is not None for trial in trials) >= CONTINUED, f"too few caches continued: {summary}"
