"""Every recorded result under benchmarks/results/ says how it was made: the command that wrote it
and the machine it ran on (a figure without both cannot be checked or compared)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import REPO

RESULTS = sorted(p for p in Path(REPO, "benchmarks", "results").iterdir() if p.suffix in (".md", ".json"))


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_a_results_file_records_its_command_and_machine(path):
    text = path.read_text()
    if path.suffix == ".json":
        record = json.loads(text)
        assert record.get("command"), f"{path.name}: no command"
        assert record.get("machine"), f"{path.name}: no machine"
    else:
        assert re.search(r"```\n(python|clusterlab|bash|make)\b", text), f"{path.name}: no command block"
        assert re.search(r"^Machine: ", text, re.M), f"{path.name}: no 'Machine:' line"
