"""benchmarks/padded_batch.py: its --quick run answers each prompt alone and all of them as one left-padded batch, with
the same answers, and writes the table and the JSON."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from kvtier.config import ReAttentionConfig

ROOT = Path(__file__).resolve().parents[2]


def _script():
    path = ROOT / "benchmarks" / "padded_batch.py"
    spec = importlib.util.spec_from_file_location("benchmark_padded_batch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_answers_the_padded_rows_as_alone_and_reports_both(tmp_path, capsys):
    assert _script().main(["--quick", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out.rstrip().splitlines()
    assert table[-1].startswith("throughput") and "padded batch" in table[-1]
    result = json.loads((tmp_path / "padded_batch.json").read_text())
    assert result["lengths"] == [516, 708, 900]
    assert result["padded"]["padded"] and result["padded"]["pads"] == [384, 192, 0]
    assert result["same_answers"] == 3
    assert [row["tokens"] for row in result["alone"]["rows"]] == [row["tokens"] for row in result["padded"]["rows"]]
    assert result["padded"]["max_position"] < ReAttentionConfig.from_dict(result["config"]).scope_bound
    assert result["throughput_ratio"] > 0 and "torch" in result["versions"]
