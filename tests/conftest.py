"""Shared pytest setup. Model builders live in tests/models.py."""

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))  # `import models` from any test file


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fullsize: runs a full-size model (a few seconds); deselect with "
                                       "-m 'not fullsize'")


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The tests run many tiny operations; on a busy machine, waking a second thread for each can
    # cost a hundred times the work itself. Speed is measured by benchmarks/, never here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Hypothesis keeps nothing in the checkout (it would write .hypothesis/ into the working directory),
# has no per-example deadline (the first call into torch is slow), and runs few examples.
_HYPOTHESIS_HOME = Path(tempfile.gettempdir()) / "tokensieve-hypothesis"
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(_HYPOTHESIS_HOME))
settings.register_profile("tokensieve", database=None, deadline=None, max_examples=30)
settings.load_profile("tokensieve")
