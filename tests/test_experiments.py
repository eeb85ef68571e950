"""experiments/: one file to run per paper setting, each block shared by several of them written once.

A paper config (experiments/*.yaml) names a shared block by its path, relative to the config's
folder (`backbone: base/backbone_cnn_digits.yaml`); jsonargparse reads the file as the value, whole.
The benchmark runner's progress file identifies a config by its bytes and those of every file it
names, so that an edit of a shared block is seen by every config that uses it.
"""

import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

from clusterlab import benchmark
from clusterlab.benchmark import config_digest, config_files
from clusterlab.cli import ClusterLabCLI
from tests.cli.test_cli import EXPERIMENTS
from tests.helpers import REPO

EXPERIMENTS_DIR = Path(REPO, "experiments")
BASE = sorted(Path(EXPERIMENTS_DIR, "base").glob("*.yaml"))
BLOCKS = ("backbone", "views", "optimizer", "lr_scheduler")  # the blocks of model.init_args a file can hold
# `views:   # base/views_digits.yaml plus the shear`: an inline block that is a shared one plus keys
# of its own (a file is taken whole: one key cannot be added to it in the config).
EXTENDS = re.compile(r"^    (\w+):\s+#\s*(base/[\w.-]+\.yaml) plus\b", re.MULTILINE)


def init_args(config: Path) -> dict:
    return yaml.safe_load(config.read_text())["model"]["init_args"]


def inline_blocks(config: Path) -> dict[str, dict]:
    return {
        key: value for key, value in init_args(config).items() if key in BLOCKS and isinstance(value, dict)
    }


def references(config: Path) -> dict[str, str]:
    return {
        key: value for key, value in init_args(config).items() if key in BLOCKS and isinstance(value, str)
    }


def test_the_runnable_configs_are_the_top_level_files_and_no_base_block():
    """tests/cli/test_cli.py parses and trains a step of each of EXPERIMENTS: every paper config, and
    no file of experiments/base/ (a block, not a config)."""
    assert len(EXPERIMENTS) >= 29 and all(p.parent == EXPERIMENTS_DIR for p in EXPERIMENTS)
    assert BASE and not set(EXPERIMENTS) & set(BASE)


def test_no_block_is_written_inline_twice():
    """A backbone, views, optimizer or scheduler that two configs use lives in experiments/base/."""
    seen: dict[str, str] = {}
    shared = {json.dumps(yaml.safe_load(p.read_text()), sort_keys=True): p.name for p in BASE}
    repeated = []
    for config in EXPERIMENTS:
        for key, block in inline_blocks(config).items():
            text = json.dumps(block, sort_keys=True)
            if text in shared:
                repeated.append(f"{config.name}: its {key} is base/{shared[text]}; name that file")
            elif text in seen:
                repeated.append(
                    f"{config.name}: its {key} is also {seen[text]}'s; move it to experiments/base/"
                )
            seen.setdefault(text, f"{config.name}")
    assert not repeated, "\n".join(repeated)


def test_every_shared_block_is_used_by_two_configs_and_every_name_is_a_base_file():
    users = {p.name: [] for p in BASE}
    for config in EXPERIMENTS:
        for key, value in references(config).items():
            path = EXPERIMENTS_DIR / value
            assert value.startswith("base/") and path in BASE, (
                f"{config.name}: {key}: {value} is no base file"
            )
            users[path.name].append(config.stem)
    for path in BASE:
        spec = yaml.safe_load(path.read_text())
        assert set(spec) == {"class_path", "init_args"}, (
            f"{path.name}: a block is a class_path and its init_args"
        )
    alone = {name: names for name, names in users.items() if len(names) < 2}
    assert not alone, f"used by one config or none (write it inline there): {alone}"


def test_an_inline_block_that_extends_a_shared_one_keeps_all_of_it():
    """The comment `# base/X.yaml plus ...` on an inline block is checked: every init arg of X, the
    same, and only keys of its own beside them, so that a change to X is not silently missed."""
    extended = []
    for config in EXPERIMENTS:
        for key, name in EXTENDS.findall(config.read_text()):
            block, base = inline_blocks(config)[key], yaml.safe_load((EXPERIMENTS_DIR / name).read_text())
            assert block["class_path"] == base["class_path"], (config.name, key)
            same = {k: v for k, v in block["init_args"].items() if k in base["init_args"]}
            assert same == base["init_args"], f"{config.name}: {key} differs from {name} in {same}"
            assert set(block["init_args"]) > set(base["init_args"]), (config.name, key)
            extended.append(config.stem)
    assert extended, "cc_digits' views and dccm_fashion_mnist's backbone extend a shared block"


def test_a_config_runs_from_another_folder_and_its_run_keeps_the_blocks_inline(in_tmp):
    """The base paths are relative to the config's folder, not to where clusterlab runs; the run's
    config.yaml holds the blocks themselves, so that it loads anywhere."""
    config = EXPERIMENTS_DIR / "simclr_digits.yaml"
    assert set(references(config)) == {"backbone", "views", "optimizer"}
    cli = ClusterLabCLI(args=["--config", str(config)], run=False)
    assert cli.model.hparams.backbone["init_args"]["widths"] == [32, 64, 128]
    assert cli.run_dir.parent.name == "simclr_digits"
    written = (cli.run_dir / "config.yaml").read_text()
    assert "base/" not in written and "widths:" in written and "erasing:" in written
    again = ClusterLabCLI(args=["--config", str(cli.run_dir / "config.yaml")], run=False).config.model
    assert again.init_args.backbone.init_args.widths == [32, 64, 128]
    assert (
        again.init_args.views.init_args.rotation == 15.0 and again.init_args.optimizer.init_args.lr == 0.001
    )


# -- the benchmark runner's identity of a config ---------------------------------------------------


def write_config(folder: Path, lr: str = "0.001") -> Path:
    (folder / "base").mkdir(parents=True, exist_ok=True)
    (folder / "base" / "optimizer.yaml").write_text(
        f"class_path: torch.optim.Adam\ninit_args: {{lr: {lr}}}\n"
    )
    (folder / "top.yaml").write_text("model:\n  init_args:\n    optimizer: base/optimizer.yaml\n")
    return folder / "top.yaml"


def test_the_digest_of_a_config_covers_every_file_it_names(tmp_path):
    top = write_config(tmp_path)
    before = config_digest(top)
    assert config_files(top) == [top, tmp_path / "base" / "optimizer.yaml"]
    write_config(tmp_path, lr="0.01")  # the shared block changes, the config's own bytes do not
    assert config_digest(top) != before
    write_config(tmp_path)
    assert config_digest(top) == before
    lone = tmp_path / "lone.yaml"  # a config that names no file: the digest of its bytes, as before
    lone.write_text("trainer:\n  max_epochs: 3\n")
    assert config_digest(lone) == hashlib.sha256(lone.read_bytes()).hexdigest()[:16]


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.stem)
def test_the_digest_of_every_experiment_covers_the_base_files_it_names(config):
    named = {Path(REPO, "experiments", value).resolve() for value in references(config).values()}
    assert {p.resolve() for p in config_files(config)} == {config.resolve(), *named}


def test_the_runner_runs_a_config_again_after_an_edit_of_a_block_it_names(tmp_path, monkeypatch):
    top = write_config(tmp_path)
    ran = []

    def fake_stage(config, seed, extra, runs_dir, threads=None, timeout=None, told=None):
        run_dir = tmp_path / "runs" / str(len(ran))
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.json").write_text(
            json.dumps({"nmi": 0.5, "acc": 0.5, "ari": 0.5, "wall_time_s": 1})
        )
        ran.append(config)
        return run_dir

    monkeypatch.setattr(benchmark, "run_stage", fake_stage)
    plan = benchmark.Plan([], None, "runs", None, tmp_path / "progress.json", {})
    method = {"name": "m", "stages": [str(top)]}
    benchmark.run_method(plan, method, 0)
    benchmark.run_method(plan, method, 0)  # the same files: taken from the progress file
    assert len(ran) == 1
    write_config(tmp_path, lr="0.01")
    benchmark.run_method(plan, method, 0)
    assert len(ran) == 2
