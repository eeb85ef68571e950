"""What the repository itself promises its readers: nothing points at files a user does not have,
and every paper is cited so that a reader can find it (title, venue, arXiv id where there is one)."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

from tests.helpers import REPO

PAPERS = {  # method: (title, venue, arXiv id or None)
    "CC": ("Contrastive Clustering", "AAAI 2021", "arXiv:2009.09687"),
    "NNM": ("Nearest Neighbor Matching for Deep Clustering", "CVPR 2021", None),
    "SCL": ("Deep Clustering by Semantic Contrastive Learning", "2021", "arXiv:2103.02662"),
    "DCCM": ("Deep Comprehensive Correlation Mining for Image Clustering", "ICCV 2019", "arXiv:1904.06925"),
    "TEMI": (
        "Exploring the Limits of Deep Image Clustering using Pretrained Models",
        "BMVC 2023",
        "arXiv:2303.17896",
    ),
}


def tracked_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [Path(REPO, name) for name in names.split() if Path(REPO, name).is_file()]


def test_no_file_points_at_the_developers_shared_folder():
    pattern = re.compile(r"shared/(papers|design)")
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for path in tracked_files()
        if path.suffix in {".py", ".md", ".yaml", ".toml", ".sh", ".txt", ""}
        and path.name != Path(__file__).name
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders


def test_the_readme_and_each_loss_module_cite_their_paper_findably():
    readme = Path(REPO, "README.md").read_text()
    for method, (title, venue, arxiv) in PAPERS.items():
        losses = Path(REPO, "clusterlab", "losses", f"{method.lower()}.py").read_text()
        head = " ".join(losses.split('"""')[1].split())  # the module docstring, lines joined
        for text, where in ((readme, "README.md"), (head, f"losses/{method.lower()}.py")):
            assert title in " ".join(text.split()), f"{where}: {method}'s title"
            assert venue in text and (arxiv is None or arxiv in text), f"{where}: {method}'s venue / arXiv id"


def test_no_function_in_the_package_is_longer_than_80_lines_and_the_cli_module_is_at_most_300():
    """Small, named pieces: a function that needs more than 80 lines is several (nested functions
    count within their parent too)."""
    long = []
    for path in sorted(Path(REPO, "clusterlab").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
    assert len(Path(REPO, "clusterlab", "cli.py").read_text().splitlines()) <= 300


def test_no_module_imports_another_modules_private_names():
    """`from clusterlab.x import _name` couples a module to another's internals: such a name is public
    where it is shared."""
    private = re.compile(r"^\s*from (clusterlab[\w.]*) import (.*)$")
    offenders = []
    for path in sorted(Path(REPO, "clusterlab").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            found = private.match(line)
            if found and any(
                n.strip().startswith("_") and n.strip() != "__version__" for n in found[2].split(",")
            ):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_every_option_of_every_method_is_documented_and_set_by_a_config_or_a_test():
    """A switch no config or test ever sets is untested code; one the docs do not list is hidden."""
    import inspect

    import clusterlab.methods as methods

    common = {"num_clusters", "backbone", "views", "optimizer", "lr_scheduler"}
    documented = Path(REPO, "docs", "options.md").read_text()
    users = {  # where an option can be set: configs, benchmark suites, tests (not this file)
        path: path.read_text()
        for path in [*Path(REPO, "experiments").rglob("*.yaml"), *Path(REPO, "tests").rglob("*.py")]
        if path.name != Path(__file__).name
    }
    undocumented, unset = [], []
    for name in ("CC", "NNM", "SCL", "DCCM", "SimCLR", "TEMI"):
        for option in list(inspect.signature(getattr(methods, name).__init__).parameters)[1:]:
            if option in common:
                continue
            if f"`{option}`" not in documented:
                undocumented.append(f"{name}.{option}")
            setting = re.compile(
                rf"(\b{option}\s*[:=]|init_args\.{option}\b|hparams\.{option}\b.*=|[\"']{option}[\"']\s*:)"
            )
            if not any(setting.search(text) for text in users.values()):
                unset.append(f"{name}.{option}")
    assert not undocumented, f"not in docs/options.md: {undocumented}"
    assert not unset, f"set by no config and no test: {unset}"
