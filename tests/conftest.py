import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402
import torch  # noqa: E402

from support import pt2e_patterns  # noqa: E402
from support.shared import fit_recipe, run_folder, shared_folder  # noqa: E402

pt2e_patterns.install()  # torchao's PT2E pattern graphs exported once per process, not at every prepare/convert

# Under pytest-xdist every worker gets one core; otherwise the two cores of CI. Processes a test starts inherit
# the worker's thread count, so tests comparing their outputs bit for bit see the same float reductions.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def pt2e_pattern_files(tmp_path_factory):
    """The PT2E pattern graphs one process exported are saved for the other processes of this run (the other
    worker, the fresh processes tests start): they load them instead of exporting them again."""
    pt2e_patterns.set_cache_dir(run_folder(tmp_path_factory) / "pt2e_patterns")
    yield
    pt2e_patterns.set_cache_dir(None)


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """One ``segcompress fit --config recipes/quickstart.yaml`` with the recipe's smoke override, per test run:
    its folder (``*/version_0/checkpoints/best-*.ckpt``, ``stdout.txt``: what the fit printed). The recipe smoke
    test checks it, and the README walk-through compresses its checkpoint."""
    return shared_folder(tmp_path_factory, "quickstart", lambda folder: fit_recipe(folder, "quickstart"))


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


def pytest_collection_modifyitems(config, items):
    """Slow tests first: pytest-xdist hands tests out in this order, so the long ones start early on both workers
    and the short ones fill in at the end instead of one worker idling while the other runs a long test."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
