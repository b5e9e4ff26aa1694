"""benchmarks/shared_prompt.py: its --quick run gives the same beams held once and held apart, and the shared cache
stores the prompt's spans once."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_runs_the_same_beams_with_the_prompt_stored_once(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("benchmark_shared_prompt", ROOT / "benchmarks" / "shared_prompt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--beams", "3", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == "same beams: yes"
    result = json.loads((tmp_path / "shared_prompt.json").read_text())
    assert result["same_beams"] and len(result["shared"]["answers"]) == 3
    assert result["apart"]["spans"] > 2 * result["shared"]["spans"]  # 3 copies of the prompt against one
