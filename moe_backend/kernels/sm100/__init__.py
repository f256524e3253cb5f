"""Blackwell (SM100/SM103): FlashInfer's TRT-LLM-gen fused-MoE kernels behind the kernel table.

Nothing here has run on a Blackwell GPU: the argument sets, weight layouts and readiness check are
verified on a CPU against the real FlashInfer (``docs/blackwell.md``). Importing this package does
not import FlashInfer; the modules do so on first use.
"""

#: The FlashInfer release the calls, layouts and tests were checked against.
TESTED_FLASHINFER = "0.7.2.post1"
