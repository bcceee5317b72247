"""Triton kernels of musefast, one file per op family; imported as musefast.kernels."""
