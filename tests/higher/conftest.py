"""Every scenario runs against ``unrollc.higher`` and, where ``higher`` 0.2.1 supports it, ``higher`` itself."""

import importlib

import pytest


@pytest.fixture(params=["unrollc.higher", "higher"])
def lib(request):
    """The library under test: ``import unrollc.higher as higher`` or ``import higher``."""
    if request.param == "higher":
        return pytest.importorskip("higher")
    return importlib.import_module(request.param)
