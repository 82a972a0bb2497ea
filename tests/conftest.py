"""Suite-wide options: `--device` runs the engine checks on another device (e.g. `pytest tests/test_engine.py
--device cuda`, as `benchmarks/gpu.sh` does); $DYNORACLE_TEST_DEVICE sets its default."""

from __future__ import annotations

import logging
import os

import pytest
import ray

# Ray's memory monitor kills worker processes when the machine as a whole nears full memory, whoever holds
# it; on a shared developer or CI machine that turns other programs' memory into failures of these tests.
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default=os.environ.get("DYNORACLE_TEST_DEVICE", "cpu"),
                     help="torch device for the engine's exactness checks (cpu, cuda, cuda:1, ...)")


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    name = request.config.getoption("--device")
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            pytest.fail(f"--device {name}, but torch sees no CUDA device")
    return name


@pytest.fixture(scope="module")
def local_ray():
    """One private local Ray for a module's in-process runs (`ray_session` joins it instead of starting its own;
    CLI runs in a subprocess still start theirs)."""
    if ray.is_initialized():  # another module's in-process run may have left its Ray up
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()
