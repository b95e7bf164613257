"""The fast tier's one setting: PyTorch computes on one thread during each unit test (and the fixtures it builds).

The fast tier must stay fast on the shared 2-core machine, where it often runs beside other work (another test run,
a training). Two OpenMP threads of one process then wait for each other's core and spin while they wait, so a small
training step takes several times longer than on one thread; on one thread it does not. No unit test's result
depends on the thread count (a test that compares two trainings runs both here). The other tiers keep PyTorch's
default.
"""

from __future__ import annotations

import pytest
import torch

DEFAULT_THREADS = torch.get_num_threads()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    torch.set_num_threads(1)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    torch.set_num_threads(DEFAULT_THREADS)
