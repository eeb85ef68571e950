"""benchmarks/device/measure.py, the prepared GPU script, in its --quick CPU mode: every part runs
end to end on toy sizes (tiny Fashion-MNIST files in the real IDX format), so that the script a GPU
session runs once cannot rot between GPU sessions (it runs in `make test`: about 36 s, a
process that imports everything and runs five parts). Run it before a GPU session spends its device
time."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.formats import write_fashion_mnist
from tests.helpers import REPO


def test_the_device_script_runs_every_part_in_quick_mode(tmp_path):
    write_fashion_mnist(tmp_path / "fashion", n=64)
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/device/measure.py",
            "--quick",
            "--out",
            str(out),
            "--data_root",
            str(tmp_path / "fashion"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "device.json").read_text())
    parts = result["parts"]
    assert sorted(parts) == list("abcde")
    assert not {k: v["error"] for k, v in parts.items() if "error" in v}
    # a) the grid ran what it says: bf16 rows' backbone output in bfloat16, float32 rows in float32
    for row in parts["a"]["rows"]:
        expected = "torch.bfloat16" if row["precision"] == "bf16-mixed" else "torch.float32"
        assert row["dtypes"] == [expected] and row["images_per_s"] > 0
    assert {(r["method"], r["precision"], r["channels_last"]) for r in parts["a"]["rows"]} == {
        (m, p, cl) for m in ("CC", "SimCLR") for p in ("32-true", "bf16-mixed") for cl in (False, True)
    }
    assert parts["b"]["authors"] > 0 and parts["b"]["clusterlab"] > 0
    assert [r["n"] for r in parts["c"]["rows"]] == [2000]
    assert 0 <= parts["d"]["acc"] <= 1 and parts["d"]["epochs"] >= 1
    assert [r["method"] for r in parts["e"]["rows"]] == ["cc", "simclr", "nnm", "scl", "dccm"]
    assert all(r["steps"] > 0 for r in parts["e"]["rows"])
    table = (out / "device.md").read_text()
    for heading in ("## a)", "## b)", "## c)", "## d)", "## e)"):
        assert heading in table
    assert "--quick: toy sizes" in table
