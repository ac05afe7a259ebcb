"""Work that several tests of one run share: made once per run (under pytest-xdist, by whichever worker asks first
while the other waits for it), in a folder beside the workers' temporary folders."""

import contextlib
import fcntl
import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from support.common import REPO, smoke_override

DONE = ".complete"


def run_folder(tmp_path_factory) -> Path:
    """A folder of this test run that every pytest-xdist worker sees (``pytest-N/``; the workers' own temporary
    folders are ``pytest-N/popen-gw*/``), created if needed."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def shared_folder(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """``run_folder/name``, filled by ``make(folder)`` once per run: a process that finds another one making it
    waits, and a ``make`` that fails leaves nothing behind, so the next test that asks tries again."""
    root = run_folder(tmp_path_factory)
    folder = root / name
    with _locked(root / f"{name}.lock"):
        if not (folder / DONE).is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            try:
                make(folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            (folder / DONE).write_text("")
    return folder


def fit_recipe(folder: Path, recipe: str, *extra: str) -> str:
    """``segcompress fit`` of ``recipes/<recipe>.yaml`` with its own smoke override into ``folder``; the text it
    printed is returned and kept in ``folder/stdout.txt``."""
    from lightning_segcompress.cli import main

    path = REPO / "recipes" / f"{recipe}.yaml"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["fit", "--config", str(path), *smoke_override(path), f"--trainer.default_root_dir={folder}",
              "--trainer.enable_progress_bar=false", *extra])
    (folder / "stdout.txt").write_text(out.getvalue())
    return out.getvalue()
