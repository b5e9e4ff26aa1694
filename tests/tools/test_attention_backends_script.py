"""benchmarks/attention_backends.py keeps running: its --quick mode (tiny shapes on the CPU, SDPA only) writes the
JSON it promises into --out and prints its table last; without CUDA the full run refuses with the fix."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "attention_backends.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_quick_times_sdpa_on_the_cpu_and_writes_json(tmp_path):
    done = _run("--quick", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.rstrip().splitlines()[-1].startswith("| tiny decode |")  # the table, last
    doc = json.loads((tmp_path / "attention_backends.json").read_text())
    assert [(row["shape"], row["backend"]) for row in doc["rows"]] == [("tiny chunk", "sdpa"), ("tiny decode", "sdpa")]
    assert all(row["ms"] > 0 and row["max_abs_diff"] == 0.0 and row["auto"] for row in doc["rows"])  # CPU: SDPA
    assert doc["meta"]["quick"] and doc["meta"]["device"] == "cpu"
    assert [p.name for p in tmp_path.iterdir()] == ["attention_backends.json"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_full_run_without_cuda_names_quick(tmp_path):
    done = _run("--out", str(tmp_path))
    assert done.returncode == 2 and "run --quick" in done.stderr
    assert not tmp_path.joinpath("attention_backends.json").exists()
