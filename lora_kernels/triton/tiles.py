"""Tile-order helpers shared by the GEMM kernels."""

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` for program ``pid`` in grouped order: GROUP_M row tiles sweep the
    column tiles together, so each weight panel is reused from L2 by GROUP_M programs instead
    of being refetched from HBM (the classic swizzle of Triton's matmul tutorial)."""
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows
    return pid_m, pid_n
