"""Fused training kernels (Triton) with plain-PyTorch references, one file per op:
rmsnorm (with fused residual add), layernorm, swiglu, rope, cross_entropy,
linear_cross_entropy (chunked LM head + loss) and adamw (fused optimizer step).

Dispatch: mlpe.kernels.dispatch (MLPE_KERNELS=auto|triton|reference); tolerances of every
op against its reference: mlpe.kernels.tolerances; per-op timings: mlpe.kernels.profile;
benchmarks: mlpe.kernels.bench (`mlpe bench kernels`).
"""
