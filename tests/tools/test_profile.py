"""`kvtier profile`: the background memory sampler, the --quick run's JSON and plots, the report's goal and flatness
checks, merging runs, and the errors for bad arguments."""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import lmdb
import matplotlib.image
import pytest
import torch

from kvtier.tools.memory import MemorySampler, disk_bytes, filesystem_of, rss_bytes
from kvtier.tools.profile import CONFIGS, add_profile_parser, run_profile
from kvtier.tools.profile_report import GOAL_HEADROOM, format_table, merge_reports, plot_memory, plot_timeline, summarize

GiB = 2**30
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kvtier")
    add_profile_parser(parser.add_subparsers())
    args = parser.parse_args(["profile", *argv])
    args.argv = ["profile", *argv]
    return args


def _write_lmdb(path, size: int) -> None:
    env = lmdb.open(str(path), subdir=False, map_size=1 << 30)
    with env.begin(write=True) as txn:
        txn.put(b"spans", os.urandom(size))
    env.sync(True)
    env.close()


# ---- the sampler ----------------------------------------------------------------------------------------------------
def test_sampler_records_phases_in_time_order_and_stops_its_thread(tmp_path):
    with MemorySampler(0.005, disk_path=tmp_path) as sampler:
        sampler.phase("first")
        time.sleep(0.06)
        _write_lmdb(tmp_path / "spill.lmdb", 4 << 20)
        sampler.phase("second")
        time.sleep(0.06)
    assert not sampler.thread.is_alive()
    samples = list(sampler.samples)
    time.sleep(0.03)
    assert len(sampler.samples) == len(samples), "no sample after the with block"
    assert len(samples) >= 8, "the background thread samples between phase calls"
    times = [sample.t for sample in samples]
    assert times == sorted(times) and times[0] >= 0
    phases = [sample.phase for sample in samples]
    order = [phase for index, phase in enumerate(phases) if index == 0 or phases[index - 1] != phase]
    assert order == ["start", "first", "second"]
    assert all(sample.rss > 0 for sample in samples)
    first = [sample.disk for sample in samples if sample.phase == "first"]
    second = [sample.disk for sample in samples if sample.phase == "second"]
    assert first[0] == 0 and 4 << 20 <= second[-1] < 6 << 20
    if not torch.cuda.is_available():
        assert all(sample.device_used is None and sample.torch_allocated is None for sample in samples)
    columns = sampler.columns()
    assert set(columns) == {"t", "phase", "device_used", "torch_allocated", "torch_peak", "rss", "disk"}
    assert len(columns["t"]) == len(samples)


def test_sampler_reads_the_gpu_through_pynvml_and_torch(monkeypatch):
    """The CUDA path with stand-ins for pynvml and torch.cuda (no GPU here): a UUID the driver does not know falls
    back to the device index, and the driver is shut down after."""
    calls = []

    class NVMLError(Exception):
        pass

    def by_uuid(uuid):
        calls.append(uuid)
        raise NVMLError("not found")

    fake = SimpleNamespace(NVMLError=NVMLError, nvmlInit=lambda: calls.append("init"),
                           nvmlShutdown=lambda: calls.append("shutdown"), nvmlDeviceGetHandleByUUID=by_uuid,
                           nvmlDeviceGetHandleByIndex=lambda index: ("handle", index),
                           nvmlDeviceGetMemoryInfo=lambda handle: SimpleNamespace(used=5 * GiB + handle[1]))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(uuid="1234"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: 3 * GiB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda index: 4 * GiB)
    with MemorySampler(0.01, device="cuda:1") as sampler:
        sampler.phase("decode")
    sample = sampler.samples[-1]
    assert (sample.device_used, sample.torch_allocated, sample.torch_peak) == (5 * GiB + 1, 3 * GiB, 4 * GiB)
    assert calls[:2] == ["init", "GPU-1234"] and calls[-1] == "shutdown"


def test_disk_bytes_counts_written_blocks_not_a_sparse_file_size(tmp_path):
    with open(tmp_path / "sparse.lmdb", "wb") as sparse:
        sparse.truncate(1 << 30)  # what an LMDB map of 1 GiB looks like before anything is written
    assert disk_bytes(tmp_path) < 1 << 20
    _write_lmdb(tmp_path / "real.lmdb", 3 << 20)
    assert 3 << 20 <= disk_bytes(tmp_path) < 5 << 20
    assert disk_bytes(tmp_path / "missing") == 0
    assert rss_bytes() > 0
    assert filesystem_of("/proc/self") == "proc" and filesystem_of(tmp_path) not in (None, "proc")


def test_sampler_without_a_disk_path_reports_none():
    with MemorySampler(0.01) as sampler:
        sampler.phase("only")
    assert all(sample.disk is None for sample in sampler.samples)
    with pytest.raises(ValueError, match="interval_s must be positive"):
        MemorySampler(0)


# ---- the quick run --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `kvtier profile --quick` run: (its folder, its JSON, what it printed)."""
    base = tmp_path_factory.mktemp("profile")
    out, spill = base / "out", base / "spill"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = run_profile(_parse(["--quick", "--out", str(out), "--disk-path", str(spill)]))
    assert code == 0
    return out, json.loads((out / "profile.json").read_text()), printed.getvalue(), spill


def test_quick_run_measures_every_cell(quick):
    _, doc, _, _ = quick
    meta = doc["meta"]
    assert meta["contexts"] == [1024, 4096] and meta["configs"] == list(CONFIGS)
    assert meta["weights_bytes"] > 0 and meta["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # K+V, layers, heads, D, f32
    cells = {(cell["config"], cell["context"]): cell for cell in doc["cells"]}
    assert set(cells) == {(config, context) for config in CONFIGS for context in (1024, 4096)}
    for (config, context), cell in cells.items():
        assert cell["status"] == "ok", cell
        assert cell["rss_peak"] > 0 and cell["build_s"] > 0 and cell["decode_ms"] > 0
        assert cell["kv_bytes"] == context * meta["kv_bytes_per_token"]
        assert (cell["lmdb_peak"] is None) == (config != "kvtier-tiers")
    assert cells[("kvtier-tiers", 4096)]["lmdb_peak"] > 0
    assert cells[("kvtier-tiers", 4096)]["kvtier"]["spans"]["disk"] > 0, "4K tokens overflow the quick budgets"
    assert cells[("kvtier-gpu", 4096)]["kvtier"]["spans"]["host"] == 0
    assert cells[("stock", 4096)]["kvtier"] is None and "prefill" in cells[("stock", 4096)]["build"]
    assert "longctx.fill" in cells[("kvtier-tiers", 4096)]["build"]


def test_quick_run_keeps_a_timeline_per_cell(quick):
    _, doc, _, _ = quick
    assert len(doc["timelines"]) == len(doc["cells"])
    for timeline in doc["timelines"]:
        assert timeline["t"] == sorted(timeline["t"])
        phases = set(timeline["phase"])
        assert "decode" in phases and ("prefill" if timeline["config"] == "stock" else "fill") in phases
        assert all(rss > 0 for rss in timeline["rss"])


def test_quick_run_writes_two_plots_prints_the_table_last_and_cleans_up(quick):
    out, doc, printed, spill = quick
    for name in ("profile-memory.png", "profile-timeline.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 300 and image.shape[1] > 500
    tail = printed.strip().splitlines()
    assert any(line.startswith("| config | measure | 1K | 4K |") for line in tail)
    assert tail[-1].startswith("Goal, kvtier-tiers at 4K")
    assert spill.is_dir() and not any(spill.iterdir()), "the spill subfolder is removed"
    assert doc["summary"]["goal"]["met"] is None, "no GPU on the quick run"


# ---- the report -----------------------------------------------------------------------------------------------------
def _on_a_gpu(doc: dict, weights: int, peaks: dict[tuple[str, int], int]) -> dict:
    """The quick run's doc as if measured on a GPU, with the given torch peaks."""
    doc = copy.deepcopy(doc)
    doc["meta"]["weights_bytes"] = weights
    for cell in doc["cells"]:
        cell["torch_peak"] = peaks[(cell["config"], cell["context"])]
        cell["device_used_peak"] = cell["torch_peak"] + GiB
    return doc


def test_goal_and_flatness_of_a_gpu_profile(quick, tmp_path):
    _, doc, _, _ = quick
    weights = 15 * GiB
    peaks = {("stock", 1024): 16 * GiB, ("stock", 4096): 20 * GiB, ("kvtier-gpu", 1024): 16 * GiB,
             ("kvtier-gpu", 4096): 19 * GiB, ("kvtier-tiers", 1024): 20 * GiB, ("kvtier-tiers", 4096): 22 * GiB}
    summary = summarize(_on_a_gpu(doc, weights, peaks))
    assert summary["goal"]["met"] is True and summary["goal"]["limit_bytes"] == weights + GOAL_HEADROOM
    assert summary["flatness"]["contexts"] == [1024, 4096]  # the tiers cells whose spans left the GPU pool: both
    assert summary["flatness"]["ratio"] == pytest.approx(22 / 20)
    assert summary["flatness"]["ratio_above_weights"] == pytest.approx(7 / 5)
    peaks[("kvtier-tiers", 4096)] = weights + GOAL_HEADROOM + 1
    missed = _on_a_gpu(doc, weights, peaks)
    assert summarize(missed)["goal"]["met"] is False
    table = format_table(missed)
    assert "MISSED" in table and "| stock | peak GPU allocated (torch) | 16 GiB | 20 GiB |" in table
    plot_memory(missed, tmp_path / "memory.png")
    plot_timeline(missed, tmp_path / "timeline.png")
    assert (tmp_path / "memory.png").read_bytes().startswith(PNG_SIGNATURE)


def test_skipped_cells_show_a_dash_and_say_why(tmp_path):
    args = _parse(["--quick", "--configs", "stock", "--contexts", "1k,4k", "--stock-limit", "2k",
                   "--out", str(tmp_path / "out"), "--disk-path", str(tmp_path)])
    assert run_profile(args) == 0
    doc = json.loads((tmp_path / "out" / "profile.json").read_text())
    skipped = [cell for cell in doc["cells"] if cell["status"] == "skipped"]
    assert [(cell["config"], cell["context"]) for cell in skipped] == [("stock", 4096)]
    assert "--stock-limit 2K" in skipped[0]["reason"]
    assert "| host RSS (peak) |" in format_table(doc) and "skipped: stock 4K" in format_table(doc)


def test_report_merges_runs_preferring_the_last_cell_that_ran(quick, tmp_path, capsys):
    out, doc, _, _ = quick
    partial = copy.deepcopy(doc)
    for cell in partial["cells"]:
        if cell["config"] == "stock":
            cell.update(status="skipped", reason="cut short")
    partial["timelines"] = [t for t in partial["timelines"] if t["config"] != "stock"]
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    merged = merge_reports([partial, doc])
    assert all(cell["status"] == "ok" for cell in merged["cells"])
    assert len(merged["timelines"]) == len(merged["cells"])
    code = run_profile(_parse(["--report", str(tmp_path / "partial.json"), str(out), "--out", str(tmp_path / "m")]))
    assert code == 0
    assert json.loads((tmp_path / "m" / "profile.json").read_text())["meta"]["merged_from"]
    assert (tmp_path / "m" / "profile-timeline.png").is_file()
    rerun = copy.deepcopy(doc)
    for cell in rerun["cells"]:
        cell["decode_ms"] = -1.0
    merged = merge_reports([doc, rerun, partial])  # partial's stock cells were cut short: rerun's stand
    assert [cell["decode_ms"] == -1.0 for cell in merged["cells"]] == [
        cell["config"] == "stock" for cell in merged["cells"]]
    other = copy.deepcopy(doc)
    other["meta"]["model"] = "another model"
    with pytest.raises(ValueError, match="different models"):
        merge_reports([doc, other])


# ---- errors ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--contexts", "lots"], "is not a length"),
    (["--configs", "stock,paged"], "unknown configuration"),
    (["--gpu-budget", "much"], "is not a size"),
    (["--interval", "0"], "must be positive"),
    (["--model", "gpt2"], "invalid choice"),
])
def test_bad_option_values_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--quick", "--model", "smollm2"], "drop --model"),
    (["--quick", "--gpu-budget", "4KiB"], "too small for this model"),
    (["--report", "no-such-profile.json"], "cannot read a profile"),
])
def test_options_that_cannot_run_exit_2_with_the_reason(argv, message, tmp_path, capsys):
    assert run_profile(_parse([*argv, "--out", str(tmp_path / "out"), "--disk-path", str(tmp_path)])) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_the_8b_shape_asks_for_a_gpu(tmp_path, capsys):
    assert run_profile(_parse(["--out", str(tmp_path)])) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_a_config_file_sets_the_kvtier_sizes_and_a_bad_one_is_a_message(tmp_path, capsys):
    from kvtier.tools.cli import main

    config = tmp_path / "kv.yaml"
    config.write_text("global_size: 8\nspan_size: 16\ntop_k: 4\nlocal_size: 256\nchunk_size: 128\n")
    out = tmp_path / "out"
    assert main(["profile", "--quick", "--configs", "kvtier-gpu", "--contexts", "1k", "--config", str(config),
                 "--out", str(out)]) == 0
    meta = json.loads((out / "profile.json").read_text())["meta"]
    assert meta["kvtier_config"]["top_k"] == 4 and meta["kvtier_config"]["span_size"] == 16
    (tmp_path / "bad.yaml").write_text("top_kk: 3\n")
    assert main(["profile", "--quick", "--config", str(tmp_path / "bad.yaml"), "--out", str(out)]) == 2
    assert "unknown kvtier config field" in capsys.readouterr().err


def test_a_run_stopped_by_sigterm_removes_its_spill_files_and_keeps_its_json_whole(tmp_path):
    """`timeout` stops a run with SIGTERM: the run unwinds (exit 143), its LMDB spill folder is gone and the cells
    saved so far read back."""
    out, spill = tmp_path / "out", tmp_path / "spill"
    command = [sys.executable, "-m", "kvtier", "profile", "--quick", "--contexts", "1k,4k,16k,64k,256k",
               "--configs", "kvtier-tiers", "--out", str(out), "--disk-path", str(spill)]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    deadline = time.monotonic() + 240
    while not list(spill.glob("kvtier-profile-*/kvtier-spill-*.lmdb")):  # a cell is spilling to LMDB
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before it spilled"
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == 128 + signal.SIGTERM, run.stderr.read()[-2000:]
    assert spill.is_dir() and list(spill.iterdir()) == []
    if (out / "profile.json").exists():
        assert json.loads((out / "profile.json").read_text())["meta"]["configs"] == ["kvtier-tiers"]
