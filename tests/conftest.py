"""Test set-up shared by every test module.

Without a CUDA GPU, Triton kernels run under Triton's CPU interpreter; the variable
must be set before any kernel module is imported (``@triton.jit`` reads it then).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI runs two pytest workers on two cores: one thread each avoids oversubscription,
# which otherwise slows the CPU tests several-fold.
torch.set_num_threads(1)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)
