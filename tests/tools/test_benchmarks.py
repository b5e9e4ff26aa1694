"""The GPU benchmark scripts keep running: their --quick modes on the CPU write the JSON and the PNG they promise into
--out, and the H200 staging scripts explain themselves and refuse an unknown stage."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kvtier.config import ReAttentionConfig
from kvtier.policies import build_policy

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(script: str, out: Path, *args: str) -> dict:
    """`python benchmarks/SCRIPT --quick --out OUT ARGS` -> the JSON it wrote; its PNG beside it, its table last."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    name = Path(script).stem
    assert (out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    assert done.stdout.rstrip().splitlines()[-1].startswith(("|", "writer at"))  # the table (spill: and its summary)
    return json.loads((out / f"{name}.json").read_text())


def test_tiers_quick_writes_every_configuration_with_its_traffic(tmp_path):
    rows = _run("tiers.py", tmp_path)["rows"]
    assert [row["config"] for row in rows] == ["gpu-only", "host", "host+disk"]
    assert all(row["decode_ms_median"] > 0 for row in rows)
    assert rows[0]["bytes_moved_per_token"]["host->gpu"] == 0 < rows[1]["bytes_moved_per_token"]["host->gpu"]
    assert rows[2]["spans"]["disk"] > 0 and rows[2]["fetch_gbps"]["disk"] > 0
    assert rows[1]["budgets"]["gpu_budget"] == 512 << 10  # bytes
    assert not (tmp_path / "spill").exists()  # the spill folder is scratch


def test_kernels_quick_reports_every_section(tmp_path):
    rows = _run("kernels.py", tmp_path)["rows"]
    sections = {"scoring", "top-k", "gather", "decode step", "prefill chunk", "consensus"}
    assert sections <= {row["section"] for row in rows}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernels.json", "kernels.png"]


def test_decode_profile_quick_profiles_stock_and_every_kvtier_configuration(tmp_path):
    rows = _run("decode_profile.py", tmp_path, "--gpu-budget", "64KiB", "--disk-path", str(tmp_path / "spill"),
                "--host-budget", "128KiB", "--top", "5")["rows"]
    assert [row["config"] for row in rows] == [
        "stock", "kvtier kernels=auto", "kvtier kernels=reference", "kvtier kernels=auto gpu_budget=64 KiB",
        "kvtier kernels=auto gpu_budget=64 KiB host_budget=128 KiB + LMDB"]
    assert list((tmp_path / "spill").iterdir()) == []  # the spill file went with its cache
    assert all(row["ms_median"] > 0 and row["ms_per_layer"] > 0 for row in rows)


def test_decode_profile_configs_picks_the_configurations_and_refuses_a_budgetless_host(tmp_path):
    rows = _run("decode_profile.py", tmp_path, "--configs", "host", "--gpu-budget", "64KiB", "--steps", "2",
                "--top", "3")["rows"]
    assert [row["config"] for row in rows] == ["kvtier kernels=auto gpu_budget=64 KiB"]
    for bad, message in ((["--configs", "host"], "--configs host needs --gpu-budget"),
                         (["--configs", "stock,gpu"], "unknown configuration")):
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_profile.py"), "--quick", *bad],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr


def test_pinning_quick_times_each_block_and_the_launches_beside_them(tmp_path):
    result = _run("pinning.py", tmp_path)
    assert len(result["block_ms"]) == result["blocks"] == 4 and not result["pinned"]  # no CUDA: plain memory
    assert result["gib_per_s"] > 0 and result["work_alone_s"] > 0 and result["work_beside_pinning_s"] > 0
    assert result["blocks_in_thread"] == 4  # the thread allocated them all while the loop ran


def test_spill_quick_measures_the_writer_against_lmdb_put_and_the_reads(tmp_path):
    result = _run("spill.py", tmp_path, "--dir", str(tmp_path), "--repeats", "1")
    assert set(result["gb_per_s"]) == {"encode_each", "lmdb_put", "writer", "read_cold", "read_warm"}
    assert all(rate > 0 for rate in result["gb_per_s"].values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spill.json", "spill.png"]  # the spill files are gone


def test_decode_profile_chunk_profiles_a_prefill_forward(tmp_path):
    result = _run("decode_profile.py", tmp_path, "--chunk", "128", "--steps", "2", "--top", "3")
    assert result["chunk"] == 128 and len(result["rows"]) == 3
    assert all(row["ms_median"] > 0 for row in result["rows"])
    stock, *kvtier = result["rows"]
    assert stock["launches"]["phases"] == {}  # no scope attention
    for row in kvtier:  # each step of the scope attention: 128 queries in chunks of 64 over 2 layers
        phases = row["launches"]["phases"]
        assert list(phases) == ["kvtier.ingest", "kvtier.select", "kvtier.gather", "kvtier.attend"]
        assert all(spent["host_ms"] > 0 for spent in phases.values())
        ranges = [spent["ranges"] for spent in phases.values()]
        assert ranges == [2, 2, 2, 2]  # each step once per layer: the forward's two chunks go at once


@pytest.mark.parametrize("script", ["decode_profile.py", "kernels.py", "multigpu.py", "selection_ranks.py", "spill.py",
                                    "tiers.py"])
def test_every_benchmark_script_explains_quick_and_out(script, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location(f"benchmark_{Path(script).stem}", ROOT / "benchmarks" / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)  # in this process, which has imported torch already: seconds less than a run
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    printed = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--quick" in printed and "--out" in printed


@pytest.mark.parametrize("script, stage", [("niah_h200.sh", "1m-a"), ("profile_h200.sh", "1m"), ("natural_h200.sh", "16k"),
                                           ("speed_h200.sh", "llama8b"), ("multigpu_h200x2.sh", "tp")])
def test_the_h200_staging_scripts_list_their_stages_and_refuse_an_unknown_one(script, stage, tmp_path):
    helped = subprocess.run(["bash", str(ROOT / "benchmarks" / script), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and helped.stdout.startswith(f"usage: bash benchmarks/{script} OUT_DIR STAGE")
    assert f"\n  {stage} " in helped.stdout
    refused = subprocess.run(["bash", str(ROOT / "benchmarks" / script), str(tmp_path / "out"), stage, "everything"],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "unknown stage 'everything'" in refused.stderr and "usage:" in refused.stderr
    assert not (tmp_path / "out").exists()  # nothing ran, not even the valid stage before it


def test_a_benchmark_stopped_by_sigterm_leaves_no_spill_file(tmp_path):
    """`timeout` stops a script with SIGTERM: it unwinds (exit 143) and its LMDB spill folder is gone."""
    spill = tmp_path / "spill"
    run = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "tiers.py"), "--quick", "--order", "host+disk",
                            "--disk-path", str(spill), "--out", str(tmp_path / "out")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    deadline = time.monotonic() + 120
    while not (spill.is_dir() and any(spill.iterdir())):  # the run is spilling to LMDB
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before it spilled"
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 128 + signal.SIGTERM, run.stderr.read()[-2000:]
    assert not spill.exists()


def test_sync_points_says_it_needs_cuda_on_a_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine the script runs (benchmarks/speed_h200.sh runs it there)")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sync_points.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "needs a CUDA device" in done.stderr and not any(tmp_path.iterdir())


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks" / "configs").glob("*.yaml")), ids=lambda path: path.name)
def test_every_benchmark_config_loads_and_builds_its_policy(path):
    config = ReAttentionConfig.from_file(path)
    assert build_policy(config.policy, config.policy_options).name == config.policy
