"""Shared test set-up: train.py's settings search (search.py) is off in the unit tests of other
parts, which compare short runs with fixed settings; tests/test_search.py turns it on."""
import pytest

import train


@pytest.fixture(autouse=True)
def no_settings_search(request, monkeypatch):
    if request.module.__name__.split('.')[-1] != 'test_search':
        monkeypatch.setitem(train.DEFAULTS, 'search', False)
