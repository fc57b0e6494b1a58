"""Fused training kernels with plain-PyTorch references (issue 5): nothing here yet."""
