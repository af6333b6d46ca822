"""Triton kernels (imported as hpcomm.triton_kernels)."""
