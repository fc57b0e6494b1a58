"""Fused training kernels (Triton) with plain-PyTorch references, one file per op.

Built so far (issue 5, in progress): rmsnorm (with fused residual add), layernorm,
swiglu, rope and cross_entropy. Dispatch: mlpe.kernels.dispatch
(MLPE_KERNELS=auto|triton|reference); tolerances of every op against its reference:
mlpe.kernels.tolerances.
"""
