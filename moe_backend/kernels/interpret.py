"""Where Triton kernels run: under Triton's CPU interpreter (``TRITON_INTERPRET=1``) or on a GPU.

``INTERPRETING`` is read once, where a kernel module is imported: Triton itself reads the
variable when it decorates a kernel, so it must be set before the kernel modules load
(``tests/conftest.py``).
"""

import os

import torch

#: True when Triton runs kernels under its CPU interpreter in this process.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def pdl_available(tensor: torch.Tensor) -> bool:
    """Whether launches on ``tensor``'s device can be programmatic dependent launches: a CUDA
    device only (the interpreter runs on CPU tensors). ``scripts/compile_kernels.py`` answers
    True for its CPU capture, so that it builds the kernels a GPU launches."""
    return tensor.is_cuda
