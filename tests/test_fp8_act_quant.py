"""The per-token e4m3 activation quantizer (triton/fp8_act_quant.py) bit for bit against torch's
float8_e4m3fn conversion: every code, every midpoint between neighbouring codes (ties to even)
and its neighbours one fp32 ulp away, subnormals, ±0, saturation past 448, NaN; and the fused
kernel's codes / row scales / shrink on random rows."""

import pytest
import torch
import triton
import triton.language as tl

from helpers import interpreting, rel_err
from lora_kernels.triton.fp8_act_quant import e4m3_from_f32, quantize_rows_e4m3

pytestmark = pytest.mark.skipif(not interpreting(), reason="Triton kernels: interpreter on CPU")


@triton.jit
def _encode_kernel(v_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    tl.store(out_ptr + i, e4m3_from_f32(tl.load(v_ptr + i, mask=ok, other=0.0)), mask=ok)


def _torch_codes(v):
    return v.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)


def _hard_values():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    vals = codes.view(torch.float8_e4m3fn).float()
    vals = vals[~torch.isnan(vals)]
    pos = torch.sort(vals[vals >= 0]).values
    mids = (pos[1:] + pos[:-1]) / 2  # exact in fp32 (3-bit mantissas)
    mids = torch.cat([mids, -mids])
    up = torch.nextafter(mids, torch.full_like(mids, float("inf")))
    down = torch.nextafter(mids, torch.full_like(mids, -float("inf")))
    special = torch.tensor([0.0, -0.0, 448.0, -448.0, 449.0, 464.0, 470.0, 1e6, -1e6,
                            float("inf"), -float("inf"), 2.0 ** -10, -(2.0 ** -10), 2.0 ** -11,
                            1e-30, -1e-30, 2.0 ** -6, 2.0 ** -6 * 0.9375, 2.0 ** -7 * 1.5])
    g = torch.Generator().manual_seed(0)
    rand = torch.cat([torch.randn(2000, generator=g) * s for s in (1e-3, 0.05, 1.0, 30.0, 300.0)])
    return torch.cat([vals, mids, up, down, special, rand])


def test_encode_bit_exact_against_torch():
    v = _hard_values()
    out = torch.empty(v.numel(), dtype=torch.int32)
    _encode_kernel[(triton.cdiv(v.numel(), 1024),)](v, out, v.numel(), BLOCK=1024)
    want = _torch_codes(v)
    bad = (out != want).nonzero().flatten()
    assert bad.numel() == 0, [(v[i].item(), out[i].item(), want[i].item()) for i in bad[:8]]


def test_encode_nan_is_0x7f():
    v = torch.tensor([float("nan"), -float("nan")])
    out = torch.empty(2, dtype=torch.int32)
    _encode_kernel[(1,)](v, out, 2, BLOCK=2)
    assert torch.equal(out & 0x7F, torch.tensor([0x7F, 0x7F], dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 33), (19, 200), (40, 17)])
def test_fused_quantize_and_shrink(dtype, shape):
    m, k = shape
    g = torch.Generator().manual_seed(m + k)
    x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4).to(dtype)
    x[0, :] = 0.0 if m > 1 else x[0, :]  # an all-zero row gets scale 1
    a = (torch.randn(5, k, generator=g) * 0.3).to(dtype)
    codes, scale, xa = quantize_rows_e4m3(x, a, block_m=16, block_k=32)
    xf = x.float()
    amax = xf.abs().amax(1)
    want_scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    assert torch.equal(scale, want_scale)
    assert torch.equal(codes.to(torch.int32), _torch_codes(xf / want_scale[:, None]))
    assert rel_err(xa, x.double() @ a.double().t()) <= (1e-5 if dtype == torch.float32 else 2e-3)
    # dequantized rows: within e4m3's relative half-ulp (2⁻⁴) of x
    deq = codes.view(torch.float8_e4m3fn).float() * scale[:, None]
    assert rel_err(deq, x.double()) <= 0.04
    c2, s2, none = quantize_rows_e4m3(x)
    assert none is None and torch.equal(c2, codes) and torch.equal(s2, scale)


_SM90_SCRIPT = r'''
from triton.runtime.jit import JITFunction
from sass_report import _ptxas_usage
_run = JITFunction.run
compiled = []
def _compile_only(self, *args, grid, warmup, **kw):
    kernel = _run(self, *args, grid=grid, warmup=True, **kw)
    regs, spills = _ptxas_usage(kernel)
    compiled.append((self.fn.__name__, regs, spills))
JITFunction.run = _compile_only
from lora_kernels.triton.fp8_act_quant import quantize_rows_e4m3
bf = torch.bfloat16
x, a = torch.empty(8192, 4096, dtype=bf), torch.empty(16, 4096, dtype=bf)
quantize_rows_e4m3(x, a)
quantize_rows_e4m3(x)
for name, regs, spills in compiled:
    assert spills == 0, (name, regs, spills)
print("compiled", len(compiled), "kernels", compiled)
'''


def test_quantizer_compiles_for_sm90_without_spills():
    from helpers import SM90_FAKE_DRIVER, run_sm90_compile
    out = run_sm90_compile(SM90_FAKE_DRIVER + _SM90_SCRIPT)
    assert "_quant_shrink_kernel" in out
