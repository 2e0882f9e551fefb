"""A Ray runtime for the cluster tests: started once, small (this machine has 2 cores), stopped at the end."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.strict import import_or_skip


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """The address of a local Ray runtime. Its CPUs are logical: 2 replicas x 1 thread, twice over, must fit."""
    ray = import_or_skip("ray")
    context = ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield context.address_info["address"]
    ray.shutdown()
