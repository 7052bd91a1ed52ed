"""The quantized-base launch plans of bench/roofline.py (issue #16): the FP8 forward with
per-token e4m3 activations, NF4 / FP8 weights on the slab route or the in-mainloop decode,
PEFT + bitsandbytes, and the NF4 decode GEMV. Built from roofline.py's per-kernel pieces
(``Launch``, the Triton and cuBLAS launch models); roofline.py's ``ops()`` calls them. Every
time is a **prediction** (see roofline.py).
"""

from __future__ import annotations

from roofline import (E, SMS, Launch, cublas_gemm, elementwise, forward_mode, pad, panel_tile,
                      rank_block, triton_decode_gemm, triton_fused_gemm, triton_panel_gemm, triton_reduce,
                      triton_shrink)

# The fp8 activation quantizer's CUDA-core work per element of x, in INT32-lane ops: ≈ 25
# SASS per element with the sm_90 hardware e4m3 cvt (bench/sass_report.py: 720 SASS for
# 16 elements per thread per step of its two K passes, the division by the row scale and the
# row max included), issued by 4 schedulers x 32 lanes = twice the 64 INT32 lanes the int rate
# counts.
QUANT_OPS_PER_ELEM = 12.5

# The NF4 decode GEMV (triton/nf4_gemv.py, M = 1, its own shrink): SASS instructions per weight
# element per launch (bench/sass_report.py "nf4 gemv M=1": K loop 4.69, plus the per-program
# prologue, x·Aᵀ share and split-K publish ≈ 615 per thread over 512 elements ≈ 1.2).
NF4_GEMV_INSTR_PER_ELEM = 4.69 + 1.2

def fp8_act_forward(M, K, N, r):
    """The FP8 forward with per-token e4m3 x (triton/quant_lora.py ``fp8_act_fwd``): the
    quantizer pass (codes, row scales and xa = x·Aᵀ from the unquantized x; one HBM read of x,
    its per-program slab re-read from L2) and the fp8 x fp8 GEMM (persistent TMA, first config
    prune_fp8_act keeps: 128x256x128 / 8 warps / 3 stages, 230-238 registers, 1 CTA per SM,
    0 spills in sm_90a), whose epilogue reads the row / column scales and seeds nothing (the
    low-rank dot comes after the scales, accumulating into the same tile)."""
    bm, bn = 128, 256
    Mp, Np, br = pad(M, bm), pad(N, bn), rank_block(r)
    minimal = Launch("minimal", 2 * M * r * (K + N), (M * K + r * K + N * r) * E + N * K,
                     (M * N + M * r) * E, flops_fp8=2 * M * N * K)
    quant = Launch("fp8 act quant + shrink (fp8_act_quant._quant_shrink_kernel)",
                   2 * M * K * br, (M * K + r * K) * E, M * K + M * 4 + M * r * E,
                   QUANT_OPS_PER_ELEM * M * K, l2=M * K * E)
    gemm = Launch("fp8 x fp8 GEMM, persistent TMA (spec fp8_act-...-seeded-...-tma)",
                  2 * Mp * Np * br, M * K + N * K + (M * r + N * r) * E + (M + N) * 4,
                  M * N * E, l2=(Np // bn - 1) * M * r * E, flops_fp8=2 * Mp * Np * K)
    return minimal, {"ours": [quant, gemm], "bare": [cublas_gemm(M, N, K, "cuBLAS x·Wᵀ (bf16)")]}



# ---------------------------------------------------------------------------------------------
# NF4 base weight (issue #16): the slab route, the in-mainloop decode, PEFT + bitsandbytes
# ---------------------------------------------------------------------------------------------
# Static sm_90a SASS per decoded element (bench/sass_report.py, Triton 3.8 ptxas, bf16):
NF4_MAINLOOP_SASS = 9.16   # the in-mainloop forward K loop, 128x128x64 / 8 warps, per element
#                            per 128-row tile (sass_report "K loop / W elem"; 21.3 in
#                            notes/nf4perf.md was an earlier decode, kept here until session 6)
NF4_MAINLOOP_DX_SASS = 16.88  # its dX (Wᵀ view, 128x128x64, p = 0; 21.5 at the dropout configs)
NF4_SLAB_SASS = 10.25      # nf4_slabs._decode_slab_kernel 64x128 / 4 warps (word store, whole
#                            tiles), once per element
NF4_BLOCK_M = 128          # the in-mainloop kernels' row tile at large M (prune_packed's pick)
# FP8 e4m3 weight-only (static sm_90a, bf16; notes/fp8slabs.md): the slab decode 64x128 / 4 warps
# with the hardware e4m3 conversion (what sm_89+ runs), once per element; the in-mainloop K loop
# of fp8_e4m3-dense-seeded-none-tiles-pointer hw cvt 128x128x64 / 8 warps (sass_report's "K loop
# / W elem"), per element per 128-row tile: 42.06 before session 6 (integer e4m3 assembly, a
# per-element scale gather at an int64 flat // K0), 6.31 now (the kernel's pointer tile, one
# scale vector per K step, cvt e4m3x2; the integer fallback is 9.09). The M ≤ 16 decode form
# (in_loop split-K, hw cvt) per element of its one row tile: 16x64x128 / 4 warps 6.06, the best
# of the configs prune_packed keeps (16x32x64: 8.69; the autotuner picks on the GPU).
FP8_SLAB_SASS = 5.25
FP8_MAINLOOP_SASS = 5.61     # the best config prune_packed keeps: 128x128x128 / 8 warps (6.31 at 64)
FP8_MAINLOOP_DX_SASS = 9.06  # its dX (Wᵀ view: the scale along K), 128x128x32, hw cvt
# The decode rows (M ≤ 16) on the GEMM core's one 16-row split-K tile, in-loop x·Aᵀ form, per W
# element (sass_report "K loop / W elem"): FP8 hw cvt 16x64x128 6.06; plain NF4 16x32x128 9.91
# (what M = 3–16 takes since session 6; the GEMV keeps M ≤ 2).
DECODE_TILE_SASS = {"FP8": 6.06, "NF4": 9.91}
# The NF4 GEMV's K loop per element at M = 4 (BLOCK_M 4, 128 rows), + the 1.2 outside it.
NF4_GEMV_M4_INSTR_PER_ELEM = 13.06 + 1.2


def nf4_bytes(N: int, K: int) -> float:
    """bitsandbytes NF4 storage: codes N·K/2 + fp32 absmax per 64 elements (not nested)."""
    return N * K / 2 + N * K / 64 * 4


def nf4_slab_width(M: int, rows: int, cols: int, granule: int, min_granule: int) -> int:
    """The slab plan (nf4_slabs.plan, called: the launcher's own arithmetic) on 132 SMs."""
    try:
        from lora_kernels.triton import nf4_slabs
        return nf4_slabs.plan(M, rows, cols, E, SMS, granule, min_granule)
    except ImportError:  # pragma: no cover - the documented default
        return 1024


def fp8_bytes(N: int, K: int) -> float:
    """e4m3 codes N·K bytes + an fp32 scale per row."""
    return N * K + N * 4


# per format: (storage bytes, slab decode SASS / element, in-mainloop SASS / element / tile,
# the same for the dX)
QUANT = {"NF4": (nf4_bytes, NF4_SLAB_SASS, NF4_MAINLOOP_SASS, NF4_MAINLOOP_DX_SASS),
         "FP8": (fp8_bytes, FP8_SLAB_SASS, FP8_MAINLOOP_SASS, FP8_MAINLOOP_DX_SASS)}


def nf4_decode(rows: int, cols: int, name: str, fmt: str = "NF4") -> Launch:
    """One slab decode: the quantized bytes of the slab in, the slab in bf16 out (written to
    HBM: counted, though the GEMM reads it back from L2), the format's slab SASS per element."""
    nbytes, slab_sass = QUANT[fmt][:2]
    return Launch(name, 0, nbytes(rows, cols), rows * cols * E, sass=rows * cols * slab_sass)


def nf4_mainloop_gemm(M, N, K, r, name, fmt: str = "NF4", dx: bool = False) -> Launch:
    """The in-mainloop quantized fused GEMM (seeded): bytes as the bf16 one with W quantized,
    plus the decode of every W element once per BLOCK_M row tile, issued beside the MMA."""
    nbytes, loop_sass = QUANT[fmt][0], QUANT[fmt][3 if dx else 2]
    l = triton_fused_gemm(M, N, K, r, 1, 0.0, name)
    l.read += nbytes(N, K) - N * K * E
    l.sass = -(-M // NF4_BLOCK_M) * N * K * loop_sass
    return l


def nf4_single_adapter(M, K, N, r, bwd, fmt: str = "NF4"):
    """NF4 / weight-only FP8 forward (and backward) at p = 0: minimal, ours (slabs at
    M ≥ nf4_slabs.min_rows(), else the in-mainloop route), the other route, PEFT + bitsandbytes (NF4) or the
    unfused dequantize + cuBLAS + LoRA composition (FP8: ``fp8_unfused``, the same graph with
    torch's dequantize), and the bf16 cuBLAS GEMM(s) ("bare")."""
    mode = forward_mode(M, r, 0.0)
    wq = QUANT[fmt][0](N, K)
    minimal = Launch("minimal", 2 * M * K * N + 2 * M * r * (K + N),
                     M * K * E + wq + (r * K + N * r) * E, (M * N + M * r) * E)
    width = nf4_slab_width(M, N, K, 128, 8)
    ours = []
    for n0 in range(0, N, width):
        n = min(width, N - n0)
        ours.append(nf4_decode(n, K, f"{fmt} slab decode W[{n0}:{n0 + n}, :]", fmt))
        if n0 == 0 and mode == 4:
            ours.append(triton_panel_gemm(M, n, K, r, "dense fused GEMM on the slab, xa panel-shared"))
        elif n0 == 0 and mode == 2:
            ours.append(triton_fused_gemm(M, n, K, r, 2, 0.0, "dense fused GEMM on the slab, in-loop xa"))
        else:
            if n0 == 0:
                ours.insert(0, triton_shrink(M, K, r, 0.0))
            ours.append(triton_fused_gemm(M, n, K, r, 1, 0.0, "dense fused GEMM on the slab, seeded"))
    deq, mm = (("bnb dequantize_4bit", "MatMul4Bit") if fmt == "NF4"
               else ("fp8.dequantize (torch)", "F.linear"))
    mainloop = [triton_shrink(M, K, r, 0.0), nf4_mainloop_gemm(M, N, K, r, f"{fmt} fused GEMM, in-loop decode", fmt)]
    # PEFT LoRA over bitsandbytes Linear4bit (lora.bnb.Linear4bit.forward, p = 0: no dropout
    # module): result = base(x).clone(); result = result + lora_B(lora_A(x)) * scaling.
    peft = [Launch(f"{deq} W", 0, wq, N * K * E),
            cublas_gemm(M, N, K, f"cuBLAS x·Wᵀ ({mm})"),
            elementwise(M * N, E, E, "result.clone()"),
            cublas_gemm(M, r, K, "cuBLAS lora_A(x)"), cublas_gemm(M, N, r, "cuBLAS lora_B(·)"),
            elementwise(M * N, E, E, "· scaling"), elementwise(M * N, 2 * E, E, "result + ·")]
    bare = [cublas_gemm(M, N, K, "cuBLAS x·Wᵀ (bf16 W)")]
    if bwd:
        minimal.flops += 2 * M * N * K + 2 * M * r * (2 * N + 2 * K)
        minimal.read += M * N * E + wq + M * K * E + M * r * E
        minimal.write += (M * K + r * K + N * r) * E
        kw = nf4_slab_width(M, K, N, 64, 64)
        panel = forward_mode(M, r, 0.0) == 4  # the first dX slab makes dyb and dB (quant_lora)
        if not panel:
            ours.append(triton_shrink(M, N, r, 0.0, "dY·B (shrink on Bᵀ)"))
        for k0 in range(0, K, kw):
            k = min(kw, K - k0)
            ours.append(nf4_decode(N, k, f"{fmt} slab decode W[:, {k0}:{k0 + k}]", fmt))
            if panel and k0 == 0:
                npm = pad(M, panel_tile()[0]) // panel_tile()[0]
                ours += [triton_panel_gemm(M, k, N, r, "dX dense fused GEMM on the slab, "
                                           "panel-shared dY·B + dB partials", db=True),
                         Launch("sum of the dB partials (torch)", 0, npm * N * rank_block(r) * 4,
                                N * r * E)]
            else:
                ours.append(triton_fused_gemm(M, k, N, r, 1, 0.0, "dX dense fused GEMM on the slab, seeded"))
        ours += [*triton_reduce(M, K, r, 0.0, "dA = xᵀ·dyb")]
        if not panel:
            ours += [*triton_reduce(M, N, r, 0.0, "dB = dYᵀ·xa")]
        mainloop += [triton_shrink(M, N, r, 0.0, "dY·B (shrink on Bᵀ)"),
                     nf4_mainloop_gemm(M, K, N, r, f"dX {fmt} fused GEMM, in-loop decode", fmt,
                                       dx=True),
                     *triton_reduce(M, K, r, 0.0, "dA = xᵀ·dyb"), *triton_reduce(M, N, r, 0.0, "dB = dYᵀ·xa")]
        # autograd through PEFT's graph: · scaling, lora_B, lora_A, MatMul4Bit (dequantize
        # again + dY·W), and the sum of the two dX contributions
        peft += [elementwise(M * N, E, E, "dY · scaling"),
                 cublas_gemm(M, r, N, "cuBLAS d(xa) = (s·dY)·B"),
                 cublas_gemm(N, r, M, "cuBLAS dB = (s·dY)ᵀ·xa"),
                 cublas_gemm(M, K, r, "cuBLAS dX_lora = d(xa)·A"),
                 cublas_gemm(r, K, M, "cuBLAS dA = d(xa)ᵀ·x"),
                 Launch(f"{deq} W (backward)", 0, wq, N * K * E),
                 cublas_gemm(M, K, N, f"cuBLAS dY·W ({mm} backward)"),
                 elementwise(M * K, 2 * E, E, "dX_base + dX_lora (autograd sum)")]
        bare += [cublas_gemm(M, K, N, "cuBLAS dY·W (bf16 W)")]
    base = {"peft_bnb" if fmt == "NF4" else "fp8_unfused": peft, "bare": bare}
    if M < slab_min_rows():  # what the op dispatches below the slab threshold
        return minimal, {"ours": mainloop, "slabs": ours, **base}
    return minimal, {"ours": ours, "mainloop": mainloop, **base}


def slab_min_rows() -> int:
    """The slab route's M threshold (nf4_slabs.min_rows, called)."""
    try:
        from lora_kernels.triton import nf4_slabs
        return nf4_slabs.min_rows()
    except ImportError:  # pragma: no cover - the documented default
        return 1024


NF4_TARGETS = {"nf4 fwd": ("bare", 1.15), "nf4 fwd+bwd": ("peft_bnb", 1 / 1.5)}


def quant_decode(M, K, N, r, fmt):
    """M ≤ 16 over a quantized W against the bf16 GEMV: the decode split-K fused GEMM (in-loop
    x·Aᵀ) reading the quantized bytes, its decode issued once (one 16-row tile), at the
    no-MMA issue rate (ISSUE_TOPS, as the GEMV: a decode launch draws next to no tensor-core
    power). NF4 at M = 4 also shows the GEMV it no longer takes (``gemv``)."""
    nbytes = QUANT[fmt][0]
    minimal = Launch("minimal", 2 * M * K * N + 2 * M * r * (K + N),
                     nbytes(N, K) + (M * K + r * K + N * r) * E, (M * N + M * r) * E)
    l = triton_decode_gemm(M, N, K, r, f"{fmt} fused GEMM, decode split-K (LORA=2), in-loop decode")
    l.read += nbytes(N, K) - N * K * E
    l.issue = N * K * DECODE_TILE_SASS[fmt]
    plans = {"ours": [l], "bare": [cublas_gemm(M, N, K, "cuBLAS x·Wᵀ (bf16 W)")]}
    if fmt == "NF4" and M == 4:
        ws = 16 * M * N * 4
        plans["gemv"] = [Launch("NF4 GEMV + own shrink (nf4_gemv, CUDA cores), M = 4",
                                minimal.flops, minimal.read + ws, minimal.write + ws,
                                issue=N * K * NF4_GEMV_M4_INSTR_PER_ELEM)]
    return minimal, plans


def nf4_decode_gemv(M, K, N, r):
    """M = 1 over an NF4 W (bitsandbytes, blocksize 64, fp32 absmax) against the bf16 GEMV: our
    one launch (triton/nf4_gemv.py: 4-bit codes + absmax, x, A, B, the split-K workspace
    [16, M, N] fp32 written and read once) bound by max(bytes, instruction issue)."""
    split = 16
    ws = split * M * N * 4
    codes = N * K / 2 + N * K / 64 * 4
    minimal = Launch("minimal", 2 * M * K * N + 2 * M * r * (K + N),
                     codes + (M * K + r * K + N * r) * E, (M * N + M * r) * E)
    # its FLOPs are counted (the consistency check), though FFMA issue is what times it
    ours = [Launch("NF4 GEMV + own shrink (nf4_gemv, CUDA cores)", minimal.flops,
                   codes + (M * K + r * K + N * r + N) * E + ws, M * N * E + ws + M * r * E,
                   issue=N * K * NF4_GEMV_INSTR_PER_ELEM)]
    return minimal, {"ours": ours, "bare": [cublas_gemm(M, N, K, "cuBLAS x·Wᵀ (bf16 W)")]}
