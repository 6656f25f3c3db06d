"""Test setup shared by the whole suite.

``TRITON_INTERPRET=1`` must be set before anything imports triton, so that the
Triton kernels run on the CPU. Tests that are not about kernels run on the torch
backend by default (the interpreter is slow); kernel tests pick the backend
explicitly with ``kernels.backend.use_backend``.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
from hypothesis import settings

from kernels.backend import use_backend

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25, print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=25)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(autouse=True)
def _torch_backend_by_default():
    with use_backend("torch"):
        yield
