"""Triton backend: @triton.jit kernels and their launchers. No autograd, no validation here
(``lora_kernels.ops`` does both); the functions exported below implement docs/BACKENDS.md."""
