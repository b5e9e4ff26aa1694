"""benchmarks/multigpu.py (issue 19's measurement): its --quick run holds a tiny Llama on the CPU as one process, split
by a device_map and split over 2 gloo ranks by tensor parallelism, and all three generate the same tokens; the
layer map splits evenly; bad launches and folders are refused with the fix."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "multigpu.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def multigpu():
    spec = importlib.util.spec_from_file_location("benchmark_multigpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _script(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="the tp layout needs torch.distributed with the gloo backend")
def test_quick_holds_the_model_three_ways_with_the_same_tokens(tmp_path):
    done = _script("--quick", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    merged = json.loads((tmp_path / "multigpu.json").read_text())
    rows = merged["rows"]
    assert [(row["layout"], row["context"]) for row in rows] == [
        ("single", 512), ("layers", 512), ("tp", 512), ("single", 1024), ("layers", 1024), ("tp", 1024)]
    assert all(row["status"] == "ok" and row["same_tokens"] for row in rows)
    assert all(len(row["tokens"]) == 5 for row in rows)  # 1 warm-up + 4 timed greedy steps
    assert {row["kv_heads"] for row in rows if row["layout"] == "tp"} == {1}  # the tiny model's 2 KV heads, 1 a rank
    assert {row["kv_heads"] for row in rows if row["layout"] != "tp"} == {2}
    assert all(row["ranks_agree"] for row in rows if row["layout"] == "tp")
    assert all(row["span_bytes"]["gpu"] > 0 and row["span_bytes"]["host"] == 0 for row in rows)
    assert [run["ranks"] for run in merged["runs"]] == [1, 1, 2]
    assert (tmp_path / "multigpu.png").read_bytes()[:8] == PNG_MAGIC
    table = done.stdout[done.stdout.index("| context"):]
    assert "| 1K | tp |" in table and "goal: tp holds 1K with no host tier: 0 B -> met" in table
    assert not list(tmp_path.rglob("*.partial"))  # the weights and every JSON written whole


def test_the_layer_map_splits_the_layers_evenly_in_order(multigpu):
    mapped = multigpu.layer_map(5, ["cuda:0", "cuda:1"])
    assert [mapped[f"model.layers.{i}"] for i in range(5)] == ["cuda:0"] * 3 + ["cuda:1"] * 2
    assert mapped["model.embed_tokens"] == "cuda:0" and (mapped["model.norm"], mapped["lm_head"]) == ("cuda:1",) * 2


def test_the_report_compares_each_layout_with_single_and_checks_the_goals(multigpu, tmp_path):
    def run(layout: str, ms: float, host: int, tokens: list[int]) -> Path:
        cell = {"context": 131072, "status": "ok", "prefill_s": 10.0, "prefill_tok_s": 13107.2, "decode_ms_median": ms,
                "decode_ms_mean": ms, "tokens": tokens, "span_bytes": {"gpu": 1, "host": host, "disk": 0},
                "kv_heads": 8, "peak_gib": {"cuda:0": 50.0}}
        path = tmp_path / layout / "multigpu.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"meta": {"layout": layout}, "cells": [cell]}))
        return path

    paths = [run("tp", 10.0, 0, [1, 2]), run("single", 20.0, 5, [1, 2]), run("layers", 25.0, 0, [1, 3])]
    _, table = multigpu.report(paths, tmp_path / "report")
    rows = json.loads((tmp_path / "report" / "multigpu.json").read_text())["rows"]
    assert [row["layout"] for row in rows] == ["single", "layers", "tp"]
    assert [row["decode_speedup"] for row in rows] == [1.0, 0.8, 2.0]
    assert [row["same_tokens"] for row in rows] == [True, False, True]
    assert "goal: tp decodes >= 1.6x faster than single at 128K: 2.0 -> met" in table
    assert "goal: layers holds 128K with no host tier: 0 B -> met" in table


@pytest.mark.parametrize("args, message", [
    (["--layout", "single", "--weights", "/nonexistent", "--device", "cpu"],
     "--weights /nonexistent is no saved model folder (no config.json): make one with --save-weights DIR"),
    (["--layout", "tp", "--weights", "WEIGHTS", "--device", "cpu"],
     "--layout tp runs one process per GPU under torchrun: torchrun --standalone --nproc_per_node 2"),
    (["--layout", "layers", "--weights", "WEIGHTS"],
     "--device cuda, but torch sees no CUDA device: run on a GPU machine, or pass --device cpu"),
    (["--save-weights", "WEIGHTS"], "exists: pass it as --weights, or remove it to save anew"),
    (["--weights", "WEIGHTS"], "give --layout single|layers|tp"),
    (["--report", "/nonexistent/multigpu.json"], "--report /nonexistent/multigpu.json: not a readable multigpu.json"),
])
def test_a_bad_launch_or_folder_is_refused_with_the_fix(args, message, tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "config.json").write_text("{}")
    given = [str(tmp_path / "weights") if arg == "WEIGHTS" else arg for arg in args]
    done = _script(*given, "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "out").exists()
