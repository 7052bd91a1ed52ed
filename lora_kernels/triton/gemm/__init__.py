"""The GEMM core: one K loop composed with schedules, operand loaders and epilogue steps.
See lora_kernels/triton/README.md for where a new format, epilogue or schedule goes."""
