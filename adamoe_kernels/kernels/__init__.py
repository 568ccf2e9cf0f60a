"""``@triton.jit`` kernels only: launching, shapes and autograd live in ``adamoe_kernels.ops``."""
