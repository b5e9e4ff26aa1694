"""What every command leaves (kvtier.tools.output): its default folder, JSON replaced whole, the table printed last."""
from __future__ import annotations

import json
import re

from kvtier.tools.output import default_out, print_report, write_json


def test_a_run_writes_under_runs_by_default():
    folder = default_out("bench")
    assert folder.parent.name == "runs" and re.fullmatch(r"bench-\d{8}-\d{6}", folder.name)


def test_json_is_replaced_whole_and_its_folder_made(tmp_path):
    path = tmp_path / "out" / "run.json"
    assert write_json(path, {"cells": [1]}) == path
    write_json(path, {"cells": [1, 2], "where": tmp_path})  # what JSON cannot hold is written as text
    assert json.loads(path.read_text()) == {"cells": [1, 2], "where": str(tmp_path)}
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]  # nothing half-written beside it


def test_the_files_come_first_and_the_table_last(tmp_path, capsys):
    print_report([tmp_path / "a.json", tmp_path / "a.png"], "| table |\n|---|")
    assert capsys.readouterr().out.splitlines() == [f"wrote {tmp_path / 'a.json'}", f"wrote {tmp_path / 'a.png'}", "",
                                                    "| table |", "|---|"]
