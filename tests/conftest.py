"""Suite-wide fixtures.

The end-to-end tests build whole DVC projects (datasets, caches, checkpoints) in module-scoped
directories. pytest removes a passing test's own ``tmp_path`` (``tmp_path_retention_policy``), but a
module's ``tmp_path_factory`` directories would stay until the session ends: several GB over the
suite. They are removed when their module ends, unless a test of that module failed.
"""
from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="module", autouse=True)
def _remove_module_directories(request, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for path in set(base.iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True)
