"""Launchers, autograd and ``torch.library`` registration of the Triton and C++ kernels."""
