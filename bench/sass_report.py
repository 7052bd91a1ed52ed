"""Static sm_90a report of the Triton kernels, on any CPU machine (no GPU needed).

Every legal GEMM-core spec (``lora_kernels.triton.gemm.spec.legal_specs``) is launched through
its real launcher (``fused_gemm``, ``multi_fused.launch_fused``, the shrink / dA / dB / mask
kernels) at the target shape, with a fake sm_90 driver and ``warmup`` launches, so each
reachable kernel × config is compiled by Triton's own ptxas; the SASS is read back with its
cuobjdump. Per kernel it prints registers, spill bytes, shared memory, CTAs per SM, the grid
against the SM count, HGMMA (wgmma) and UTMA (TMA) instruction counts, the SASS length, and
for the dropout paths the extra SASS instructions per element the mask costs (static count:
dropout variant minus the same kernel without it, per element each thread holds).

    python bench/sass_report.py [--fast] [--check] [--json out.json]

``--fast`` compiles the first reachable config of each (spec, operand form) instead of all of
them (what CI runs); ``--check`` exits non-zero on any spill, or when the large-M forward or
dX path (what ``fused_gemm`` picks at M = 8192 on a GPU) lacks wgmma or TMA.

Target shape: M = 8192, K = N = 4096, r = 16, bf16 (the decode specs: M = 1). 132 SMs (H100
SXM; an H200 has the same count). Everything here is static: GPU times are not predicted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import types  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

SMS = 132
M_T, K_T, N_T, R_T = 8192, 4096, 4096, 16
REGS_PER_SM, SMEM_PER_SM, THREADS_PER_SM = 65536, 228 * 1024, 2048


class _FakeSm90Driver:
    """What Triton asks its driver for when it only compiles (``warmup=True``)."""
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_active_torch_device(self): return torch.device("cpu")
    def get_device_interface(self): return torch.cuda
    def get_benchmarker(self): return None


def install_fake_sm90_driver() -> None:
    """Make this process compile for sm_90 without a GPU (tests/helpers.SM90_FAKE_DRIVER)."""
    driver.set_active(_FakeSm90Driver())


@dataclass
class Row:
    kernel: str
    form: str
    config: str
    grid: int
    regs: int = 0
    spill: int = 0
    smem: int = 0
    ctas_per_sm: int = 0
    hgmma: int = 0
    utma: int = 0
    wgmma_e4m3: int = 0  # PTX wgmma.mma_async ... .e4m3.e4m3 (the fp8 x fp8 GEMM's MMA)
    sass: int = 0
    elems_per_thread: float = 0.0
    drop_per_elem: float | None = None
    extra: dict = field(default_factory=dict)


def _opcodes(sass: str) -> list[str]:
    """Opcodes of Triton's SASS dump (``ctrl<TAB>[@pred ]OPCODE operands;`` per line)."""
    ops = []
    for line in sass.splitlines():
        if "\t" not in line:
            continue
        text = line.split("\t", 1)[1].strip()
        if text.startswith("@"):
            text = text.split(None, 1)[1] if " " in text else ""
        m = re.match(r"([A-Z][A-Z0-9_.]*)", text)
        if m:
            ops.append(m.group(1))
    return ops


def loop_instructions(sass: str) -> list[str]:
    """Opcodes of the longest natural loop of Triton's SASS dump (a branch back to a label
    defined above it): for the NF4 GEMV, its K loop."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines)
              if (m := re.match(r"^(\w+):\s*$", line.strip()))}
    best: list[str] = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+(\w+);", line)
        if m and labels.get(m.group(1), i) < i:
            body = _opcodes("\n".join(lines[labels[m.group(1)]:i + 1]))
            best = body if len(body) > len(best) else best
    return best


def _ptxas_usage(k) -> tuple[int, int]:
    """(registers, spill-store bytes) from ptxas -v on the kernel's PTX (what the GPU driver
    would report as n_regs / n_spills; the fake driver loads nothing)."""
    import subprocess
    import tempfile
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(k.asm["ptx"])
        out = subprocess.run([str(ptxas), "-v", "-arch=sm_90a", str(src), "-o",
                              str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    log = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    return int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else -1


def _ctas_per_sm(regs: int, smem: int, threads: int) -> int:
    regs_warp = ((max(regs, 1) * 32 + 255) // 256) * 256  # allocated per warp in 256s
    by_regs = REGS_PER_SM // (regs_warp * (threads // 32))
    by_smem = SMEM_PER_SM // (smem + 1024) if smem else 32
    return max(0, min(by_regs, by_smem, THREADS_PER_SM // threads, 32))


class Compiler:
    """Replaces the launchers' kernel objects: ``kernel[grid](*args, **kw)`` compiles (warmup)
    every config left after the launcher's own pruning (or the first one with ``fast``)."""

    def __init__(self, fast: bool):
        self.fast = fast
        self.rows: list[Row] = []
        self.form = ""
        # The p = 0 twin of a dropout kernel is compiled with the configs the dropout variant
        # prunes to, so the two differ only in the mask code.
        self.prune_as_dropout = False
        self.only = None  # compile only forms containing this text

    def wrap(self, fn, name, configs=None, prune=None, elems=None):
        outer = self

        class _Launch:
            def __getitem__(self, grid):
                def call(*args, **kw):
                    if outer.only and outer.only not in f"{name} {outer.form}":
                        return
                    cfgs = [None]
                    if configs:
                        named = dict(zip(fn.arg_names, args))
                        pkw = {**kw, "DROPOUT": True} if outer.prune_as_dropout else kw
                        cfgs = prune(configs, named, **pkw) if prune else list(configs)
                        if outer.fast:
                            cfgs = cfgs[:1]
                    for c in cfgs:
                        outer._compile(fn, name, grid, args, kw, c, elems)
                return call
        return _Launch()

    def _compile(self, fn, name, grid, args, kw, cfg, elems):
        extra = dict(cfg.all_kwargs()) if cfg is not None else {}
        meta = {**dict(zip(fn.arg_names, args)), **kw, **extra}
        meta.setdefault("num_warps", 4)
        meta.setdefault("num_stages", 3)
        g = grid(meta) if callable(grid) else grid
        k = fn.run(*args, grid=g, warmup=True, **kw, **extra)
        threads = 32 * k.metadata.num_warps
        ops = _opcodes(k.asm["sass"])
        tile = {key: meta[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "CHUNKS", "SPLIT_K",
                                           "BLOCK_P", "WARP_SPEC") if key in meta}
        if name == "slab_decode":
            tile.update(BLOCK_R=meta["BLOCK_R"], BLOCK_C=meta["BLOCK_C"])
        tile.update(w=k.metadata.num_warps, s=meta["num_stages"])
        regs, spill = _ptxas_usage(k)
        row = Row(kernel=name, form=self.form, config=" ".join(f"{a}={b}" for a, b in tile.items()),
                  grid=int(torch.tensor(g).prod()), regs=regs, spill=spill,
                  smem=k.metadata.shared,
                  # wgmma in SASS: HGMMA (16-bit operands), QGMMA (fp8 e4m3/e5m2)
                  hgmma=sum(o.startswith(("HGMMA", "QGMMA")) for o in ops),
                  utma=sum(o.startswith("UTMA") for o in ops), sass=len(ops),
                  wgmma_e4m3=len(re.findall(r"wgmma\.mma_async\S*\.e4m3\.e4m3", k.asm["ptx"])))
        row.ctas_per_sm = _ctas_per_sm(row.regs, row.smem, threads)
        if elems is not None:
            row.elems_per_thread = elems(meta) / threads
        if name == "nf4_gemv":  # K-loop SASS (and memory) instructions per decoded element
            loop = loop_instructions(k.asm["sass"])
            mem = sum(o.split(".")[0] in ("LDG", "LDS", "STS", "SHFL", "LDGSTS", "LDSM")
                      for o in loop)
            row.extra = dict(loop_per_elem=round(len(loop) / row.elems_per_thread, 2),
                             mem_per_elem=round(mem / row.elems_per_thread, 2))
        if name in ("gemm", "multi_gemm") and self.form.startswith(("fp8_e4m3-", "nf4-",
                                                                  "nf4_nested-")):
            # a W decoded in the K loop: the loop's SASS per W element a thread decodes per
            # step (BLOCK_K·BLOCK_N / threads), paid once per BLOCK_M-row tile of x
            loop = loop_instructions(k.asm["sass"])
            row.extra = dict(w_loop_per_elem=round(
                len(loop) * threads / (meta["BLOCK_K"] * meta["BLOCK_N"]), 2))
        self.rows.append(row)


def _packed_nf4(nested: bool, n: int, k: int):
    """An NF4 operand (bitsandbytes layout, blocksize 64) of an [n, k] weight, for compiling."""
    from lora_kernels.triton.gemm.formats import PackedWeight, QROUND_BF16
    from lora_kernels.triton.gemm.modes import WEIGHT_NF4, WEIGHT_NF4_NESTED
    blocks = n * k // 64
    absmax = torch.empty(blocks, dtype=torch.uint8 if nested else torch.float32)
    return PackedWeight(torch.empty(n * k // 2, dtype=torch.uint8), absmax,
                        torch.empty(blocks // 256 + 1) if nested else None,
                        torch.empty(272 if nested else 16), 0.5,
                        int(WEIGHT_NF4_NESTED if nested else WEIGHT_NF4), 64, 256,
                        int(QROUND_BF16), (n, k))


def _bits(rows: int, cols: int) -> torch.Tensor:
    """A packed keep mask (uint8 [rows, ceil(cols/8)]) for the bit-reading/writing forms."""
    return torch.empty(rows, (cols + 7) // 8, dtype=torch.uint8)


def run(fast: bool, only: str | None = None) -> list[Row]:
    install_fake_sm90_driver()
    import lora_kernels as lk
    import lora_kernels.triton.configs as C
    import lora_kernels.triton.fused_gemm as FG
    import lora_kernels.triton.lowrank as LR
    import lora_kernels.triton.multi_fused as MF
    import lora_kernels.triton.dropout as DR
    from lora_kernels.triton.gemm.modes import LoraMode
    from lora_kernels.triton.gemm.spec import legal_specs

    C.num_sms = lambda device: SMS
    FG.C.num_sms = C.num_sms
    comp = Compiler(fast)
    comp.only = only
    tile_elems = lambda m: m["BLOCK_M"] * m["BLOCK_N"]
    FG.autotuned = lambda shape_class, dev: comp.wrap(
        FG.heuristic_kernel, "gemm", *FG._LISTS[shape_class], elems=tile_elems)
    LR._shrink_kernel = comp.wrap(LR._shrink_kernel, "shrink",
                                  elems=lambda m: m["BLOCK_M"] * m["BLOCK_K"])
    LR._reduce_rows_kernel = comp.wrap(LR._reduce_rows_kernel, "reduce_rows",
                                       elems=lambda m: m["BLOCK_P"] * m["BLOCK_M"])
    DR._keep_mask_kernel = comp.wrap(DR._keep_mask_kernel, "keep_mask",
                                     elems=lambda m: m["BLOCK_R"] * m["BLOCK_C"])

    dt = torch.bfloat16
    e = lambda *s: torch.empty(*s, dtype=dt)
    for spec in legal_specs():
        if spec.rows == "gathered":
            continue
        M = 1 if spec.schedule == "split_k" else M_T
        path_max = 16 if spec.schedule == "split_k" else 0
        x, w, b, y = e(M, K_T), e(N_T, K_T), e(N_T), e(M, N_T)
        a, bb, u = e(R_T, K_T), e(N_T, R_T), e(M, R_T)
        cs = torch.empty(N_T, dtype=torch.float32) if spec.col_scale == "vector" else None
        lora = {"none": LoraMode.NONE, "seeded": LoraMode.SEEDED,
                "in_loop": LoraMode.IN_LOOP, "panel": LoraMode.PANEL}[spec.lowrank]
        common = dict(lora=lora, u=u, la=a, lb=bb, scaling=2.0, col_scale=cs, small_m_max=path_max,
                      schedule=spec.schedule, store=spec.store)
        if spec.weight == "fp8_act":  # fp8 x fp8: e4m3 codes of x and W, fp32 row / col scales
            f8 = torch.float8_e4m3fn
            common.update(a_scale=torch.empty(M), w_scale=torch.empty(N_T))
            for m in (M, 1) if spec.schedule == "tiles" else (M,):
                comp.form = f"{spec.name} fwd" + (" M=1" if m == 1 else "")
                FG.fused_gemm(torch.empty(m, K_T, dtype=f8), torch.empty(N_T, K_T, dtype=f8),
                              e(m, N_T), bias=b, **{**common, "u": e(m, R_T),
                                                    "a_scale": torch.empty(m)})
            continue  # its backward is the weight-only fp8_e4m3 path's dX
        # FP8 W: the integer e4m3 decode (pre-sm_89, the interpreter) and, tagged "hw cvt",
        # the hardware conversion every sm_89+ launch takes (formats.QFLAG_HW_CVT)
        variants = ((" hw cvt", True), ("", False)) if spec.weight == "fp8_e4m3" else (("", False),)
        for tag, hw in variants:
            FG.hw_cvt_ok = lambda t, hw=hw: hw
            name = spec.name + tag
            if spec.weight == "fp8_e4m3":  # e4m3 bytes + per-row scale of the same weight
                from lora_kernels.triton.quant_lora import packed_fp8
                w = packed_fp8(types.SimpleNamespace(
                    codes=torch.empty(N_T, K_T, dtype=torch.uint8), scale=torch.empty(N_T)))
            elif spec.weight != "dense":  # NF4 storage of the same [N_T, K_T] weight
                w = _packed_nf4(spec.weight == "nf4_nested", N_T, K_T)
            comp.form = f"{name} fwd"
            FG.fused_gemm(x, w, y, bias=b, **common)
            if spec.lowrank == "seeded":  # the dX form: N-major Wᵀ view, dropout mask epilogue
                dy, dx = e(M, N_T), e(M, K_T)
                for p in (0.0, 0.1):
                    comp.form = f"{name} dX p={p}"
                    comp.prune_as_dropout = True
                    FG.fused_gemm(dy, w.t(), dx, **{**common, "la": None, "lb": a.t(), "u": e(M, R_T)},
                                  dropout_p=p, seed=7)
                # the dX epilogue reading the forward's packed mask (#13 item 4) instead of Philox
                comp.form = f"{name} dX bits p=0.1"
                comp.prune_as_dropout = True
                FG.fused_gemm(dy, w.t(), dx, **{**common, "la": None, "lb": a.t(), "u": e(M, R_T)},
                              dropout_p=0.1, seed=7, keep_bits=_bits(M, K_T))
                comp.prune_as_dropout = False
            if spec.lowrank == "panel":  # the p = 0 dX form: dyb shares on Bᵀ + the dB partials
                dy, dx = e(M, N_T), e(M, K_T)
                comp.form = f"{name} dX+dB"
                FG.fused_gemm(dy, w.t(), dx, **{**common, "la": bb.t(), "lb": a.t(), "u": e(M, R_T)},
                              db_out=e(N_T, R_T), db_u=e(M, R_T))
            if spec.lowrank == "panel" and spec.col_scale == "none":
                # the p > 0 dX: its low-rank tile masked on its own from the forward's packed bits
                # (no column scale: the single-adapter dX has none; with one, the pointer path
                # spilled 152 B at 128x128 / 8 warps, so fused_gemm refuses that combination)
                comp.form = f"{name} dX+dB bits p=0.1"
                comp.prune_as_dropout = True
                FG.fused_gemm(dy, w.t(), dx, **{**common, "la": bb.t(), "lb": a.t(), "u": e(M, R_T)},
                              db_out=e(N_T, R_T), db_u=e(M, R_T), dropout_p=0.1, seed=7,
                              keep_bits=_bits(M, K_T))
                comp.prune_as_dropout = False
            if (spec.lowrank == "none" and spec.schedule == "tiles" and spec.col_scale == "none"
                    and spec.weight == "dense"):
                comp.form = f"{name} dW"
                FG.fused_gemm(e(M_T, N_T).t(), e(M_T, K_T).t(), e(N_T, K_T), small_m_max=0)

    x = e(M_T, K_T)
    reduce_config = C.reduce_config
    C.reduce_config = lambda dropout=False: reduce_config(True)  # same tiles for both twins
    for p in (0.0, 0.1):
        comp.form = f"shrink p={p}"
        LR.shrink(x, e(R_T, K_T), e(M_T, R_T), p, 7)
        comp.form = f"dA reduce p={p}"
        LR.reduce_rows(x, e(M_T, R_T), e(R_T, K_T).t(), 2.0, p, 7)
    # packed mask (#13 item 4): the forward shrink also writes the bits, dA reads them
    comp.form = "shrink bits p=0.1"
    LR.shrink(x, e(R_T, K_T), e(M_T, R_T), 0.1, 7, keep_bits=_bits(M_T, K_T))
    comp.form = "dA reduce bits p=0.1"
    LR.reduce_rows(x, e(M_T, R_T), e(R_T, K_T).t(), 2.0, 0.1, 7, keep_bits=_bits(M_T, K_T))
    C.reduce_config = reduce_config
    # The fp8 x fp8 path's quantizer (codes + row scales + xa in one pass), both encodes: the
    # integer one (interpreter / pre-sm_89) and the sm_89+ hardware cvt a GPU launch takes.
    import lora_kernels.triton.fp8_act_quant as FQ
    FQ._quant_shrink_kernel = comp.wrap(FQ._quant_shrink_kernel, "fp8_act_quant",
                                        elems=lambda m: m["BLOCK_M"] * m["BLOCK_K"])
    for hw in (False, True):
        comp.form = f"fp8 act quant + shrink, {'hw cvt' if hw else 'integer'} encode"
        FQ.quantize_rows_e4m3(x, e(R_T, K_T), hw_cvt=hw)
    comp.form = "keep mask"
    DR.dropout_keep_mask(7, M_T, K_T, 0.1)
    DR._keep_bits_kernel = comp.wrap(DR._keep_bits_kernel, "keep_bits",
                                     elems=lambda m: m["BLOCK_R"] * m["BLOCK_C"])
    comp.form = "keep bits"
    DR.dropout_keep_packed(7, M_T, K_T, 0.1)

    # The multi-adapter fused forward (gathered rows, per-slot epilogue), first GPU config.
    S, T = 64, 8192
    batch = lk.LoRABatch.from_adapter_ids(torch.arange(T) % 8, S)
    comp.form = f"{MF.SPEC.name} fwd"
    MF._fused_even_k = comp.wrap(MF._fused_even_k, "multi_gemm",
                                 elems=tile_elems)
    cfg0 = C.MULTI_FUSED[0]
    MF.launch_fused(e(T, K_T), e(N_T, K_T), None, e(T, N_T), torch.empty(T, R_T),
                    e(S, N_T, R_T), None, torch.tensor([0, N_T], dtype=torch.int32), batch,
                    R=R_T, n_slices=1, prec="tf32", lora_prec="tf32", interpret=False,
                    config={**cfg0.kwargs, "num_warps": cfg0.num_warps,
                            "num_stages": cfg0.num_stages})
    # The same over quantized bases (FP8 / NF4 decoded in the K loop), first config the
    # register budget (formats.prune_packed) keeps.
    from lora_kernels.triton.quant_lora import packed_fp8
    for fmt, spec in MF.QUANT_SPECS.items():
        w = packed_fp8(types.SimpleNamespace(codes=torch.empty(N_T, K_T, dtype=torch.uint8),
                                             scale=torch.empty(N_T))) if fmt == "fp8_e4m3" \
            else _packed_nf4(fmt == "nf4_nested", N_T, K_T)
        configs = MF.quant_configs(w.weight)
        for cfgq, hw in [(c, h) for c in (configs[:1] if fast else configs)
                         for h in ((True, False) if fmt == "fp8_e4m3" else (False,))]:
            MF.hw_cvt_ok = lambda t, hw=hw: hw
            comp.form = f"{spec.name}{' hw cvt' if hw else ''} fwd"
            MF.launch_fused(e(T, K_T), w, None, e(T, N_T), torch.empty(T, R_T),
                            e(S, N_T, R_T), None, torch.tensor([0, N_T], dtype=torch.int32),
                            batch, R=R_T, n_slices=1, prec="tf32", lora_prec="tf32",
                            interpret=False,
                            config={**cfgq.kwargs, "num_warps": cfgq.num_warps,
                                    "num_stages": cfgq.num_stages})
    _slab_forms(comp, e)
    # The NF4 decode GEMV (M ≤ 8, CUDA cores; triton/nf4_gemv.py) at M = 1, 2, 4, 8, plain
    # and nested absmax, with bias and the LoRA term (its own shrink), at the launcher's GPU
    # config.
    import lora_kernels.triton.nf4_gemv as NG
    NG.num_sms = lambda device: SMS
    kernel = NG.nf4_gemv_kernel
    for nested in (False, True):
        for m in (1, 2, 4, 8):
            comp.form = f"nf4{'_nested' if nested else ''} gemv M={m}"
            cfg = NG.gemv_config(m, N_T, K_T, 64, torch.device("cuda"), nested)
            warps = cfg.pop("num_warps")
            NG.nf4_gemv_kernel = comp.wrap(kernel, "nf4_gemv",
                                           elems=lambda meta: meta["BLOCK_N"] * meta["CHUNKS"] * 64)
            # p = 0: x·Aᵀ made in the kernel (what the op launches at inference)
            NG.nf4_gemv(e(m, K_T), _packed_nf4(nested, N_T, K_T), e(m, N_T), e(N_T), e(m, R_T),
                        e(N_T, R_T), 2.0, la=e(R_T, K_T), config={**cfg, "num_warps": warps})
    NG.nf4_gemv_kernel = kernel
    _dropout_cost(comp.rows)
    return comp.rows


def _slab_forms(comp: "Compiler", e) -> None:
    """The NF4 / FP8 slab route (lora_kernels/triton/nf4_slabs.py) at the target shape: the slab
    decode kernel (SASS per element = the whole program over the elements each thread
    decodes: one tile per program, no loop) for a forward row slab and a dX column slab,
    NF4 plain and nested and FP8 e4m3, and the dense fused GEMMs it launches per slab. On a GPU these operands
    take persistent + TMA (tma_compatible holds for x, the workspace and y[:, n0:n1] /
    dX[:, k0:k1]); this CPU process has no CUDA tensors, so the schedule is forced here, and
    store="tma" raises if the slab views could not take descriptors."""
    import functools
    import lora_kernels.triton.fused_gemm as FG
    import lora_kernels.triton.nf4_slabs as NS
    from lora_kernels.triton.quant_lora import packed_fp8
    NS._decode_slab_kernel = comp.wrap(NS._decode_slab_kernel, "slab_decode",
                                       elems=lambda m: m["BLOCK_R"] * m["BLOCK_C"])
    real_gemm = NS.fused_gemm
    NS.fused_gemm = functools.partial(FG.fused_gemm, schedule="persistent", store="tma")
    start = len(comp.rows)
    try:
        for nested in (False, True):
            w = _packed_nf4(nested, N_T, K_T)
            kind = "nested" if nested else "plain"
            width = NS.fwd_plan(M_T, w, 2, torch.device("cuda"))
            comp.form = f"nf4 slabs {kind} decode fwd slab [{width}, {K_T}]"
            NS.decode_slab(w, e(width, K_T), 0, width, 0, K_T)
            width = NS.dx_plan(M_T, w, 2, torch.device("cuda"))
            comp.form = f"nf4 slabs {kind} decode dX slab [{N_T}, {width}]"
            NS.decode_slab(w, e(N_T, width), 0, N_T, width, 2 * width)
        # weight-only FP8 e4m3 (one byte and a row scale per element in, the compute dtype
        # out); its slab GEMMs are the NF4 ones below (the same dense kernels on a bf16 slab)
        w = packed_fp8(types.SimpleNamespace(codes=torch.empty(N_T, K_T, dtype=torch.uint8),
                                             scale=torch.empty(N_T)))
        for hw in (True, False):  # hw: what sm_89+ runs (hw_cvt_ok); integer: the fallback
            cvt = "hw cvt" if hw else "integer"
            width = NS.fwd_plan(M_T, w, 2, torch.device("cuda"))
            comp.form = f"fp8 slabs {cvt} decode fwd slab [{width}, {K_T}]"
            NS.decode_slab(w, e(width, K_T), 0, width, 0, K_T, hw_cvt=hw)
            width = NS.dx_plan(M_T, w, 2, torch.device("cuda"))
            comp.form = f"fp8 slabs {cvt} decode dX slab [{N_T}, {width}]"
            NS.decode_slab(w, e(N_T, width), 0, N_T, width, 2 * width, hw_cvt=hw)
        w = _packed_nf4(False, N_T, K_T)
        x, a, bb = e(M_T, K_T), e(R_T, K_T), e(N_T, R_T)
        for p, first, how in ((0.0, 4, "xa panel-shared in slab 0"),
                              (0.1, 1, "dropout: shrink, then seeded")):
            comp.form = f"nf4 slabs persistent-tma fwd ({how})"
            NS.slab_fwd(x, w, e(N_T), a, bb, 2.0, p, 7, first, 16)
        dy, dyb, xa = e(M_T, N_T), e(M_T, R_T), e(M_T, R_T)
        # dyb and dB panel-shared in slab 0 (what quant_lora_bwd runs at this M), then seeded
        panel = dict(panel=True, xa=xa, db_out=e(N_T, R_T))
        comp.form = "nf4 slabs persistent-tma dX p=0.0"
        NS.slab_dx(dy, w, a, bb, dyb, 2.0, 0.0, 7, 16, **panel)
        comp.form = "nf4 slabs persistent-tma dX bits p=0.1"
        comp.prune_as_dropout = True
        NS.slab_dx(dy, w, a, bb, dyb, 2.0, 0.1, 7, 16, keep_bits=_bits(M_T, K_T), **panel)
        comp.prune_as_dropout = False
    finally:
        NS.fused_gemm = real_gemm
    # every slab launches the same kernels: one row per (kernel, form, config)
    seen, keep = set(), []
    for r in comp.rows[start:]:
        key = (r.kernel, r.form, r.config)
        if key not in seen:
            seen.add(key)
            keep.append(r)
    comp.rows[start:] = keep


def _dropout_cost(rows: list[Row]) -> None:
    """Extra SASS per element of the p > 0 variant over the same kernel and config at p = 0."""
    base = {(r.kernel, r.form.replace("p=0.1", "p=0.0"), r.config): r for r in rows
            if "p=0.0" in r.form}
    for r in rows:
        if "p=0.1" in r.form:  # a " bits" variant is costed against the same p = 0 kernel
            b = base.get((r.kernel, r.form.replace(" bits", "").replace("p=0.1", "p=0.0"),
                          r.config))
            if b is not None and r.elems_per_thread:
                r.drop_per_elem = (r.sass - b.sass) / r.elems_per_thread


def print_table(rows: list[Row]) -> None:
    head = ("kernel", "form", "config", "regs", "spill", "smem KiB", "CTA/SM", "grid/SMs",
            "H/QGMMA", "UTMA", "wgmma e4m3", "SASS",
            "drop instr/elem (nf4_gemv: K loop; slab_decode: SASS/elem; in-loop W decode: K loop)")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        drop = "" if r.drop_per_elem is None else f"{r.drop_per_elem:.1f}"
        if r.extra.get("loop_per_elem") is not None:
            drop = f"K loop {r.extra['loop_per_elem']} / elem, mem {r.extra['mem_per_elem']}"
        if r.extra.get("w_loop_per_elem") is not None:
            drop = (f"{drop}; " if drop else "") + f"K loop {r.extra['w_loop_per_elem']} / W elem"
        if r.kernel == "slab_decode" and r.elems_per_thread:  # one tile a program, no loop
            drop = f"{r.sass / r.elems_per_thread:.2f} SASS/elem"
        waves = r.grid / (SMS * max(r.ctas_per_sm, 1))
        print(f"| {r.kernel} | {r.form} | {r.config} | {r.regs} | {r.spill} | "
              f"{r.smem / 1024:.0f} | {r.ctas_per_sm} | {r.grid}/{SMS} ({waves:.2f} waves) | "
              f"{r.hgmma} | {r.utma} | {r.wgmma_e4m3} | {r.sass} | {drop} |")


def check(rows: list[Row]) -> list[str]:
    """Failures: any spill; a large-M forward / dX path (persistent-tma, the default at
    M = 8192 on a GPU) without wgmma or TMA; an fp8 x fp8 (fp8_act) GEMM of ≥ 64-row tiles
    whose PTX has no e4m3 x e4m3 wgmma."""
    bad = [f"{r.kernel} {r.form} {r.config}: {r.spill} B spilled" for r in rows if r.spill]
    hot = [r for r in rows if r.kernel == "gemm" and "persistent-tma" in r.form
           and ("fwd" in r.form or "dX" in r.form)]
    if not hot:
        bad.append("no large-M persistent-tma forward/dX kernel was compiled")
    bad += [f"{r.kernel} {r.form} {r.config}: HGMMA={r.hgmma} UTMA={r.utma}" for r in hot
            if not (r.hgmma and r.utma)]
    bad += [f"{r.kernel} {r.form} {r.config}: no wgmma e4m3.e4m3 in the PTX" for r in rows
            if r.kernel == "gemm" and r.form.startswith("fp8_act") and "M=1" not in r.form
            and not r.wgmma_e4m3]
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fast", action="store_true", help="first reachable config per form only")
    ap.add_argument("--check", action="store_true", help="fail on spills / missing wgmma+TMA")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--only", help="compile only kernels whose 'kernel form' contains this")
    args = ap.parse_args(argv)
    rows = run(args.fast, args.only)
    print_table(rows)
    print(f"\ncompiled {len(rows)} kernels")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    if args.check:
        bad = check(rows)
        if args.only and "persistent-tma" not in args.only:  # --only never compiled it
            bad = [b for b in bad if not b.startswith("no large-M persistent-tma")]
        for b in bad:
            print("FAIL:", b)
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
