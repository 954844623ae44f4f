"""Shared test set-up: train.py's settings search (search.py) is off in the unit tests of other
parts, which compare short runs with fixed settings; tests/test_search.py turns it on. Runs use a
fixed thread count (not runtime.CpuShare's, which follows the machine's load), so runs compared
bit for bit do not depend on what else the machine runs."""
import pytest
import torch

import train

THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def no_settings_search(request, monkeypatch):
    if request.module.__name__.split('.')[-1] != 'test_search':
        monkeypatch.setitem(train.DEFAULTS, 'search', False)


@pytest.fixture(autouse=True)
def fixed_threads(monkeypatch):
    monkeypatch.setitem(train.DEFAULTS, 'threads', THREADS)
    yield
    torch.set_num_threads(THREADS)
