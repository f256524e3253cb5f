"""Fused-experts kernels: the torch reference, Triton SM90 kernels, and the selection table."""
