"""Whether Triton kernels run under Triton's CPU interpreter (``TRITON_INTERPRET=1``).

Read once, where a kernel module is imported: Triton itself reads the variable when it
decorates a kernel, so it must be set before the kernel modules load (``tests/conftest.py``).
"""

import os

#: True when Triton runs kernels under its CPU interpreter in this process.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
