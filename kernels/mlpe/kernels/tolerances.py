"""Per-dtype tolerances of every op against its reference, stated once (tests use these).

The fused kernels accumulate in fp32 like the references, but in a different order, and
round their outputs to the input dtype: bf16 keeps 8 bits of mantissa, fp16 11.
"""

import torch

TOLERANCES = {  # dtype: (atol, rtol)
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}
# Reductions over a whole row or a whole batch (weight gradients) add more rounding.
GRAD_TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (5e-2, 5e-2),
    torch.float16: (1e-2, 1e-2),
}
