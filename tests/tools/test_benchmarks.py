"""The GPU benchmark scripts keep running: their --quick modes on the CPU write the JSON (and PNG) they promise."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(script: str, *args: str) -> None:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_tiers_quick_writes_every_configuration_with_its_traffic(tmp_path):
    _run("tiers.py", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "tiers.json").read_text())["rows"]
    assert [row["config"] for row in rows] == ["gpu-only", "host", "host+disk"]
    assert all(row["decode_ms_median"] > 0 for row in rows)
    assert rows[0]["bytes_moved_per_token"]["host->gpu"] == 0 < rows[1]["bytes_moved_per_token"]["host->gpu"]
    assert rows[2]["spans"]["disk"] > 0 and rows[2]["fetch_gbps"]["disk"] > 0
    assert (tmp_path / "tiers.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "spill").exists()  # the spill folder is scratch


def test_kernels_quick_reports_every_section(tmp_path):
    out = tmp_path / "kernels.json"
    _run("kernels.py", "--out", str(out))
    sections = {row["section"] for row in json.loads(out.read_text())["rows"]}
    assert {"scoring", "top-k", "gather", "decode step", "prefill chunk"} <= sections


def test_decode_profile_quick_profiles_stock_and_every_kvtier_configuration(tmp_path):
    _run("decode_profile.py", "--gpu-budget", "64KiB", "--disk-path", str(tmp_path / "spill"), "--host-budget",
         "128KiB", "--top", "5", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "decode_profile.json").read_text())["rows"]
    assert [row["config"] for row in rows] == [
        "stock", "kvtier kernels=auto", "kvtier kernels=reference", "kvtier kernels=auto gpu_budget=64KiB",
        "kvtier kernels=auto gpu_budget=64KiB host_budget=128KiB + LMDB"]
    assert list((tmp_path / "spill").iterdir()) == []  # the spill file went with its cache
    assert all(row["ms_median"] > 0 and row["ms_per_layer"] > 0 for row in rows)


def test_spill_quick_measures_the_writer_against_lmdb_put_and_the_reads(tmp_path):
    out = tmp_path / "spill.json"
    _run("spill.py", "--dir", str(tmp_path), "--repeats", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert set(result["gb_per_s"]) == {"encode_each", "lmdb_put", "writer", "read_cold", "read_warm"}
    assert all(rate > 0 for rate in result["gb_per_s"].values())
    assert [p.name for p in tmp_path.iterdir()] == ["spill.json"]  # the spill files are gone


def test_decode_profile_chunk_profiles_a_prefill_forward(tmp_path):
    _run("decode_profile.py", "--chunk", "128", "--steps", "2", "--top", "3", "--out", str(tmp_path))
    result = json.loads((tmp_path / "decode_profile.json").read_text())
    assert result["chunk"] == 128 and len(result["rows"]) == 3
    assert all(row["ms_median"] > 0 for row in result["rows"])
