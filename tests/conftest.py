"""Shared fixtures."""

from __future__ import annotations

import os

import pytest
import torch


def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Small torch models run far faster on one thread of a shared, busy CPU."""
    yield from _threads(1)


@pytest.fixture
def two_threads():
    """Two intra-op threads: where a nondeterministic kernel would show (the project's promise is
    bit-reproducible training with 2 threads)."""
    yield from _threads(2)


if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest workers on the two cores: one intra-op thread each, so the workers
    # do not fight over the cores (the tests that check 2-thread determinism ask for two_threads)
    torch.set_num_threads(1)
