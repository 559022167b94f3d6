"""Shared fixtures and hypothesis profiles."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
settings.register_profile(
    "long", deadline=None, max_examples=5000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
settings.load_profile(os.environ.get("SYNCSTORE_HYPOTHESIS", "ci"))


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``slow`` (the long variants) unless SYNCSTORE_SLOW=1."""
    if os.environ.get("SYNCSTORE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="long variant: run with SYNCSTORE_SLOW=1")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


@pytest.fixture
def store_path(tmp_path):
    """A fresh directory for a store."""
    return str(tmp_path / "store")
