"""The folder command run once, for the tests of its parts that read a finished output."""

from __future__ import annotations

import pytest
from filelock import FileLock

from clusterlab.cli import main
from tests.cluster.folders import write_photo_folder


@pytest.fixture(scope="session")
def grouped(tmp_path_factory):
    """The command run once on a folder of four kinds (K auto), shared by the tests that read it
    (the command's, the report's and the output folder's): once per `make test`, not once per file
    or per xdist worker. The workers of one session share the parent of their temporary folders;
    the first to get the lock runs the command, the others read its output."""
    root = tmp_path_factory.getbasetemp().parent / "cluster-grouped"
    folder, out = root / "photos", root / "grouped"
    with FileLock(f"{root}.lock"):
        if not (out / "cluster.json").is_file():
            root.mkdir(exist_ok=True)
            write_photo_folder(folder)
            # Epochs, not minutes, end the training here, so that the result does not depend on the load.
            main(
                [
                    "cluster",
                    str(folder),
                    "--out",
                    str(out),
                    "--epochs",
                    "40",
                    "--minutes",
                    "5",
                    "--batch_size",
                    "40",
                ]
            )
    return folder, out
