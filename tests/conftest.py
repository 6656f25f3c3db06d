"""Test setup shared by the whole suite.

Kernel tests run on ``LOWRANK_TEST_DEVICE`` (default ``cpu``; see tests/lora_checks.py).
On the CPU, ``TRITON_INTERPRET=1`` is set before anything imports triton, so that the
Triton kernels run through the interpreter; with ``LOWRANK_TEST_DEVICE=cuda`` it is left
alone and the same tests run the compiled kernels on the GPU (the tests that are not
about kernels stay on the CPU). Tests that are not about kernels run on the torch
backend by default (the interpreter is slow); kernel tests pick the backend explicitly
with ``kernels.backend.use_backend``.
"""

import os

import pytest
from hypothesis import settings

ON_CPU = os.environ.get("LOWRANK_TEST_DEVICE", "cpu") == "cpu"
if ON_CPU:
    os.environ["TRITON_INTERPRET"] = "1"

from kernels.backend import use_backend  # noqa: E402  (only once TRITON_INTERPRET is settled)

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25, print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=25)
# On a GPU every new shape compiles and autotunes the kernels (seconds each): fewer, fixed examples.
settings.register_profile("gpu", derandomize=True, deadline=None, max_examples=4, print_blob=True)
default_profile = "dev" if ON_CPU else "gpu"
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", default_profile))


@pytest.fixture(autouse=True)
def _torch_backend_by_default():
    with use_backend("torch"):
        yield
