"""Fixtures shared across the test folders."""

import pytest
import torch

# The slowest files first. `make test` runs two xdist workers that take whole files (module fixtures
# such as the SLURM cluster must run once); started first, these overlap each other instead of
# leaving one worker alone with the last of them while the other has finished.
SLOW_FIRST = ("tests/test_gpu_check.py", "tests/test_stages.py", "tests/workflow/test_slurm.py",
              "tests/workflow/test_workflow.py", "tests/data/test_imagefolder_e2e.py", "tests/methods/test_ddp.py",
              "tests/methods/test_resume.py", "tests/workflow/test_dvc.py", "tests/workflow/test_interrupted.py")


def pytest_collection_modifyitems(config, items):
    rank = {f: i for i, f in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is faster than two, and steady on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
