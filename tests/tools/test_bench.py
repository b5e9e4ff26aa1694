"""`kvtier bench`: the --quick run end to end (JSON, PNG, table, goals), bad arguments, the goals and the skips."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json

import pytest
import torch

from kvtier.tools import bench
from kvtier.tools.bench import add_bench_parser, run_bench
from kvtier.tools.bench_report import KVTIER_METHODS, METHODS, goals

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtier")
    add_bench_parser(parser.add_subparsers())
    return parser


def _run(*argv: str) -> int:
    args = _parser().parse_args(["bench", *argv])
    args.argv = ["bench", *argv]  # as kvtier.tools.cli.main sets it
    return run_bench(args)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run (tiny random Llama on the CPU, contexts 1K and 4K): (exit code, bench.json, output folder)."""
    out = tmp_path_factory.mktemp("bench")
    code = _run("--quick", "--out", str(out), "--disk-path", str(out / "spill"))
    return code, json.loads((out / "bench.json").read_text()), out


def _cell(result: dict, method: str, context: int) -> dict:
    (cell,) = [c for c in result["cells"] if c["method"] == method and c["context"] == context]
    return cell


def test_quick_run_writes_json_and_png(quick):
    code, result, out = quick
    assert code == 0
    assert (out / "bench.png").read_bytes()[:8] == PNG_SIGNATURE
    assert {(c["method"], c["context"]) for c in result["cells"]} == {(m, c) for m in METHODS for c in (1024, 4096)}
    assert result["settings"]["contexts"] == [1024, 4096] and result["ceilings"] is None
    assert result["meta"]["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # K+V, 2 layers, 2 KV heads, dim 16, fp32
    assert (result["settings"]["gpu_budget"], result["settings"]["host_budget"]) == (512 << 10, 512 << 10)  # bytes
    assert not (out / "spill").exists() or not any((out / "spill").iterdir())  # the spill file went with its cell


def test_quick_cells_have_positive_timings(quick):
    _, result, _ = quick
    measured = [("stock", 1024)] + [(m, c) for m in KVTIER_METHODS for c in (1024, 4096)]
    for method, context in measured:
        cell = _cell(result, method, context)
        assert cell["status"] == "ok", cell
        assert 0 < cell["decode"]["ms_median"] and 0 < cell["decode"]["ms_mean"] and cell["decode"]["steps"] == 4
        assert cell["prefill"]["tok_s"] > 0 and cell["prefill"]["seconds"] > 0
        assert len(cell["decode"]["tokens"]) == 1 + 4  # the greedy answer: the warm-up step and the 4 timed ones
        forwards = cell["prefill"]["forward_ms"]  # one per prefill chunk (256 tokens in --quick), adding up to all
        assert len(forwards) == -(-cell["prefill"]["tokens"] // 256) and all(ms > 0 for ms in forwards)
        assert sum(forwards) <= 1e3 * cell["prefill"]["seconds"] * 1.01
        assert cell["launches"] is None and cell["peak_gpu_gib"] is None  # CUDA only
    # up to --max-prefill (1K in --quick) a real prefill; beyond, a fill and one real chunk at full depth
    assert _cell(result, "kvtier", 1024)["prefill"] == {**_cell(result, "kvtier", 1024)["prefill"], "kind": "real",
                                                         "tokens": 1024}
    after = _cell(result, "kvtier", 4096)
    assert after["prefill"]["kind"] == "after-fill" and after["prefill"]["tokens"] == 256 and after["fill_s"] > 0


def test_quick_tiers_hold_spans_and_report_traffic(quick):
    _, result, _ = quick
    assert _cell(result, "kvtier", 4096)["tiers"]["spans"]["host"] == 0
    host = _cell(result, "kvtier-host", 4096)
    assert host["tiers"]["spans"]["host"] > 0 and host["tiers"]["spans"]["disk"] == 0
    disk = _cell(result, "kvtier-disk", 4096)
    assert disk["tiers"]["spans"]["disk"] > 0
    assert host["transfer"]["bytes_per_token"]["host->gpu"] > 0
    assert sum(disk["transfer"]["bytes_per_token"].values()) > 0
    assert host["transfer"]["pct_of_ceiling"] is None  # no ceilings measured off CUDA


def test_quick_skips_name_their_reason(quick):
    _, result, _ = quick
    assert "--max-prefill" in _cell(result, "stock", 4096)["reason"]
    for context in (1024, 4096):
        cell = _cell(result, "offloaded", context)
        assert cell["status"] == "skipped" and "CUDA" in cell["reason"]


def test_quick_goals_are_ratios_of_this_run(quick):
    _, result, _ = quick
    by_name = {g["name"]: g for g in result["goals"]}
    assert set(by_name) == {"decode_flat", "decode_vs_stock", "prefill_vs_stock", "prefill_flat", "host_vs_offloaded",
                            "tiers_same_answer"}
    flat = by_name["decode_flat"]
    long, short = (_cell(result, "kvtier", context)["decode"]["ms_mean"] for context in (4096, 1024))
    expected = long / short
    assert flat["ratio"] == pytest.approx(expected, rel=1e-3) and flat["met"] == (flat["ratio"] <= 1.3)
    for name in ("decode_vs_stock", "prefill_vs_stock", "prefill_flat"):
        assert by_name[name]["ratio"] > 0 and isinstance(by_name[name]["met"], bool)
    assert by_name["host_vs_offloaded"]["met"] is None and "offloaded" in by_name["host_vs_offloaded"]["note"]
    same = by_name["tiers_same_answer"]  # kvtier-disk against all on the GPU at 4K: the same prompt, tiered spans
    assert same["compared"] == "kvtier-disk @ 4K / kvtier @ 4K" and 0 <= same["ratio"] <= 1
    assert same["met"] == (same["ratio"] == 1)


def test_table_is_printed_last(quick, capsys, tmp_path):
    assert _run("--quick", "--methods", "stock,kvtier", "--contexts", "1k", "--decode-steps", "1",
                "--out", str(tmp_path)) == 0
    printed = capsys.readouterr().out
    assert printed.rstrip().splitlines()[-1].startswith("| tiers_same_answer")
    assert "decode ms/token" in printed and "| stock | " in printed and "needs two --contexts" in printed


# ---- arguments ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--methods", "stock,fast"], "choose from stock, offloaded"),
    (["--contexts", "lots"], "write e.g. 16k"),
    (["--gpu-budget", "huge"], "not a size"),
    (["--decode-steps", "0"], "positive"),
    (["--prefill", "half"], "invalid choice"),
])
def test_bad_option_values_exit_2_naming_the_fix(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["bench", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--quick", "--model", "smollm2"], "drop --model"),
    (["--model", "llama8b", "--device", "cpu"], "--quick"),
    (["--quick", "--config", "missing.yaml"], "does not exist"),
    (["--quick", "--contexts", ","], "--contexts is empty"),
])
def test_bad_option_combinations_return_2_naming_the_fix(argv, message, capsys, tmp_path):
    assert _run(*argv, "--out", str(tmp_path)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_a_config_that_does_not_fit_the_window_returns_2(tmp_path, capsys):
    config = tmp_path / "kv.yaml"
    config.write_text("top_k: 4096\n")
    assert _run("--quick", "--config", str(config), "--out", str(tmp_path)) == 2
    assert "lower top_k" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine cannot show the refusal of --device cuda without one; this runs on every CPU-only machine (CI)")
def test_cuda_without_a_device_returns_2(tmp_path, capsys):
    assert _run("--quick", "--device", "cuda", "--out", str(tmp_path)) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["bench", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--contexts", "--methods", "--decode-steps", "--prefill", "--max-prefill",
                   "--gpu-budget", "--host-budget", "--disk-path", "--out", "--quick", "--device", "--dtype"):
        assert option in text


# ---- memory planning ------------------------------------------------------------------------------------------------
def test_a_cell_that_would_not_fit_is_skipped_with_its_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "host_bytes", lambda field: 1 << 20)  # 1 MiB of RAM: nothing fits on the CPU
    args = _parser().parse_args(["bench", "--quick", "--out", str(tmp_path)])
    plan = bench.make_plan(args)
    model, _ = bench.build_model(plan)
    cell = bench.Bench(model, plan).cell("kvtier-host", 4096, None)
    assert cell["status"] == "skipped" and "GiB of device memory" in cell["reason"]


def test_kvtier_on_cuda_precompiles_the_selection_kernels_up_to_the_longest_context(monkeypatch, tmp_path, capsys):
    from kvtier.kernels import warmup

    calls, span_score_calls = [], []
    monkeypatch.setattr(warmup, "precompile", lambda **shapes: calls.append(shapes) or 10)
    monkeypatch.setattr(warmup, "precompile_span_scores", lambda **shapes: span_score_calls.append(shapes) or 4)
    plan = bench.make_plan(_parser().parse_args(["bench", "--quick", "--out", str(tmp_path)]))
    model, _ = bench.build_model(plan)
    on_cuda = dataclasses.replace(plan, device=torch.device("cuda"))  # precompile itself is faked: no CUDA needed
    bench.Bench(model, on_cuda).precompile_kernels()
    (shapes,) = span_score_calls  # the default policy, consensus: only its span-score kernel
    assert not calls and (shapes["window"], shapes["q_heads"], shapes["kv_heads"]) == (64, 6, 2)
    span_score_calls.clear()
    plan = dataclasses.replace(plan, kvtier_config=plan.kvtier_config.replace(policy="quest"))
    bench.Bench(model, plan).precompile_kernels()
    assert not calls  # the CPU: nothing is compiled
    on_cuda = dataclasses.replace(plan, device=torch.device("cuda"))  # precompile itself is faked: no CUDA needed
    bench.Bench(model, dataclasses.replace(on_cuda, methods=["stock"])).precompile_kernels()
    assert not calls  # no kvtier method
    bench.Bench(model, on_cuda).precompile_kernels()
    (shapes,) = calls
    assert not span_score_calls
    config = plan.kvtier_config.resolve(model.config.max_position_embeddings)
    tokens = 4096 + 1 + 4 + 1  # the longest context, --quick's warm-up and decode steps, the profiled step
    assert shapes["max_spans"] == -(-tokens // config.span_size)
    assert (shapes["kind"], shapes["aggregation"], shapes["summary_size"]) == ("bound", "vote", 2)  # quest
    assert (shapes["top_k"], shapes["chunk_size"], shapes["q_heads"]) == (config.top_k, config.chunk_size, 6)
    assert "compiled the Triton selection kernels" in capsys.readouterr().err


# ---- goals from made-up cells ---------------------------------------------------------------------------------------
def _made_up(method: str, context: int, ms: float, tok_s: float, kind: str = "real") -> dict:
    return {"method": method, "context": context, "status": "ok", "reason": None,
            "decode": {"ms_median": ms}, "prefill": {"kind": kind, "tok_s": tok_s}}


def test_goals_compare_the_right_cells():
    k, m = 1 << 10, 1 << 20
    cells = [
        _made_up("stock", 8 * k, 60.0, 7000.0), _made_up("stock", 128 * k, 65.0, 6000.0),
        _made_up("offloaded", 128 * k, 900.0, 2000.0),
        _made_up("kvtier", 8 * k, 80.0, 9000.0), _made_up("kvtier", 32 * k, 82.0, 9000.0),
        _made_up("kvtier", 128 * k, 85.0, 5000.0),
        {"method": "kvtier", "context": m, "status": "skipped", "reason": "too big"},
        _made_up("kvtier-host", 128 * k, 100.0, 4000.0), _made_up("kvtier-host", m, 100.0, 5000.0, "after-fill"),
    ]
    result = {"settings": {"contexts": [8 * k, 32 * k, 128 * k, m]}, "cells": cells}
    by_name = {g["name"]: g for g in goals(result)}
    assert by_name["decode_flat"]["compared"] == "kvtier-host @ 1M / kvtier @ 8K"  # kvtier@1M did not fit
    assert by_name["decode_flat"]["ratio"] == 1.25 and by_name["decode_flat"]["met"] is True
    assert by_name["decode_vs_stock"]["ratio"] == pytest.approx(80 / 60, abs=1e-3)
    assert by_name["decode_vs_stock"]["met"] is True
    assert by_name["prefill_vs_stock"]["compared"] == "kvtier @ 128K / stock @ 128K"
    assert by_name["prefill_vs_stock"]["met"] is False
    assert by_name["prefill_flat"]["compared"] == "kvtier @ 32K / kvtier-host @ 1M"
    assert by_name["prefill_flat"]["ratio"] == 1.8 and "after-fill" in by_name["prefill_flat"]["note"]
    assert by_name["host_vs_offloaded"]["ratio"] == 9.0 and by_name["host_vs_offloaded"]["met"] is True


def test_same_answer_compares_the_tiered_cells_tokens_with_all_on_the_gpu():
    def decoded(method: str, context: int, tokens: list[int]) -> dict:
        cell = _made_up(method, context, 5.0, 100.0)
        cell["decode"]["tokens"] = tokens
        return cell

    cells = [decoded("kvtier", 1024, [1, 2, 3, 4]), decoded("kvtier-host", 1024, [1, 2, 3, 4]),
             decoded("kvtier", 4096, [5, 6, 7, 8]), decoded("kvtier-disk", 4096, [5, 6, 9, 8])]
    result = {"settings": {"contexts": [1024, 4096]}, "cells": cells}
    same = {g["name"]: g for g in goals(result)}["tiers_same_answer"]
    assert same["compared"] == "kvtier-disk @ 4K / kvtier @ 4K"
    assert same["ratio"] == 0.5 and same["met"] is False  # the first two tokens agree, then the answers part
    result["cells"] = cells[:2]
    same = {g["name"]: g for g in goals(result)}["tiers_same_answer"]
    assert same["compared"] == "kvtier-host @ 1K / kvtier @ 1K" and same["ratio"] == 1.0 and same["met"] is True
    result["cells"] = [_made_up("kvtier", 1024, 5.0, 100.0), _made_up("kvtier-host", 1024, 5.0, 100.0)]
    assert "no decoded tokens" in {g["name"]: g for g in goals(result)}["tiers_same_answer"]["note"]


def test_a_goal_without_its_cells_says_which_are_missing():
    result = {"settings": {"contexts": [1024, 4096]}, "cells": [_made_up("kvtier", 1024, 5.0, 100.0)]}
    by_name = {g["name"]: g for g in goals(result)}
    assert by_name["decode_flat"]["met"] is None and by_name["decode_flat"]["note"] == "not measured: no kvtier @ 4K"
    assert by_name["decode_vs_stock"]["note"] == "not measured: no stock @ 1K"


def test_transfer_floor_is_the_slower_direction_at_the_pinned_ceiling(tmp_path):
    """HF's offloaded cache moves its K/V through CPU copies torch pins (non-blocking GPU->CPU), each direction on its
    own copy engine: the floor is the slower direction at the pinned ceiling."""
    args = _parser().parse_args(["bench", "--quick", "--out", str(tmp_path)])
    plan = bench.make_plan(args)
    runner = bench.Bench(bench.build_model(plan)[0], plan)
    ceilings = {"pageable_h2d_gbps": 10.0, "pageable_d2h_gbps": 5.0, "pinned_h2d_gbps": 50.0, "pinned_d2h_gbps": 40.0}
    moved = runner.transfer("offloaded", None, None, 1 << 20, step_ms=400.0, ceilings=ceilings)
    kv = (1 << 20) * 512  # 1M tokens of 512 bytes of K/V: 512 MiB up and down every step
    assert moved["bytes_per_token"] == {"host->gpu": kv, "gpu->host": kv} and moved["ceiling"] == "pinned"
    floor_ms = kv / 40e9 * 1e3  # GPU->host, the slower direction
    assert moved["floor_ms"] == pytest.approx(floor_ms, abs=1e-3)
    assert moved["pct_of_ceiling"] == pytest.approx(100 * floor_ms / 400.0, abs=0.1)


def test_report_merges_runs_and_recomputes_floors_and_goals(quick, tmp_path, capsys):
    _, result, _ = quick
    later = copy.deepcopy(result)
    later["cells"] = [{**_cell(result, "kvtier", 4096), "context": 8192}]
    later["meta"]["command"] = ["kvtier", "bench", "--contexts", "8k"]
    earlier = copy.deepcopy(result)
    earlier["ceilings"] = {"pageable_h2d_gbps": 10.0, "pageable_d2h_gbps": 5.0, "pinned_h2d_gbps": 50.0,
                           "pinned_d2h_gbps": 40.0}
    for cell in earlier["cells"]:
        if cell["status"] == "ok" and cell["transfer"]:
            cell["transfer"].update(ceiling="pageable", floor_ms=1e6)  # what an older version wrote
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, doc in zip(paths, (earlier, later)):
        path.write_text(json.dumps(doc))
    assert _run("--report", *map(str, paths), "--out", str(tmp_path / "merged")) == 0
    merged = json.loads((tmp_path / "merged" / "bench.json").read_text())
    assert merged["settings"]["contexts"] == [1024, 4096, 8192] and len(merged["meta"]["commands"]) == 2
    assert {(c["method"], c["context"]) for c in merged["cells"]} == {
        *((m, c) for m in METHODS for c in (1024, 4096)), ("kvtier", 8192)}
    host = _cell(merged, "kvtier-host", 4096)["transfer"]
    assert host["ceiling"] == "pinned" and host["floor_ms"] < 1e6
    assert next(g for g in merged["goals"] if g["name"] == "decode_flat")["compared"] == "kvtier @ 8K / kvtier @ 1K"
    assert (tmp_path / "merged" / "bench.png").read_bytes()[:8] == PNG_SIGNATURE
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("| tiers_same_answer")


def test_report_of_a_file_that_is_not_a_bench_json_returns_2(tmp_path, capsys):
    wrong = tmp_path / "profile.json"
    wrong.write_text(json.dumps({"meta": {}, "cells": []}))
    assert _run("--report", str(wrong)) == 2
    assert "is not a `kvtier bench` bench.json" in capsys.readouterr().err
