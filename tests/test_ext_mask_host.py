"""The CUDA kernels' dropout mask equals the reference's, proved on a CPU.

``csrc/kernels/philox.h`` holds the mask definition the CUDA kernels run (Philox4x32-10, the
element → 16-bit-half map, the threshold, and the fused GEMM's one-call-per-8-elements quad
shuffle) as ``__host__ __device__`` functions. ``tests/csrc/mask_check.cpp`` includes that same
header, built by the host compiler, and prints the mask each kernel path draws; here it is
compared bit for bit with ``lora_kernels.reference.dropout_keep_mask`` (definition v2).
"""

import os
import shutil
import subprocess

import pytest
import torch

from lora_kernels import reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = os.environ.get("CXX", "g++")


@pytest.fixture(scope="module")
def mask_check(tmp_path_factory):
    if shutil.which(CXX) is None:
        pytest.skip(f"no host C++ compiler ({CXX})")
    exe = tmp_path_factory.mktemp("mask_check") / "mask_check"
    subprocess.run([CXX, "-std=c++20", "-O1", "-pthread", "-Wall", "-Werror",
                    "-I", os.path.join(ROOT, "csrc", "kernels"),
                    os.path.join(ROOT, "tests", "csrc", "mask_check.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)

    def run(mode, seed, rows, cols, p=0.5, row_offset=0):
        out = subprocess.run([str(exe), mode, str(seed & (2**64 - 1)), str(rows), str(cols),
                              repr(float(p)), str(row_offset)],
                             check=True, capture_output=True, text=True).stdout.split("\n")
        if mode in ("words", "bits"):
            return torch.tensor([[int(w) for w in line.split()] for line in out if line])
        threshold = int(out[0].split()[1])
        rows_txt = [line for line in out[1:] if line]
        assert len(rows_txt) == rows and all(len(r) == cols and set(r) <= {"0", "1"} for r in rows_txt)
        mask = torch.tensor([[c == "1" for c in r] for r in rows_txt], dtype=torch.bool)
        return threshold, mask.reshape(rows, cols)

    return run


@pytest.mark.parametrize("seed", [0, 7, 0x1234_5678_9ABC_DEF0, 2**64 - 1])
def test_host_philox_words_equal_reference(mask_check, seed):
    got = mask_check("words", seed, 21, 0)
    words = ref.philox4x32(seed, torch.arange(21, dtype=torch.int64))
    assert torch.equal(got, torch.stack(words, dim=-1))


@pytest.mark.parametrize("p", [1e-9, 0.05, 0.5, 0.99999, 1.0])
def test_host_threshold_equals_reference(mask_check, p):
    threshold, _ = mask_check("one", 1, 1, 1, p)
    assert threshold == min(ref.keep_threshold(p), 65536)


# odd sizes (partial groups, partial 16x16 GEMM tiles), a row offset, seeds past 2^63
CASES = [(3, 13, 5, 0.5, 0), (7, 19, 37, 0.05, 0), (2**63 + 5, 17, 24, 0.3, 5), (99, 1, 8, 0.9, 41)]


@pytest.mark.parametrize("mode", ["one", "vec8", "vec4", "quad"])
@pytest.mark.parametrize("seed,rows,cols,p,row_offset", CASES)
def test_host_kernel_mask_equals_reference(mask_check, mode, seed, rows, cols, p, row_offset):
    _, got = mask_check(mode, seed, rows, cols, p, row_offset)
    want = ref.dropout_keep_mask(seed, rows, cols, p, row_offset=row_offset)
    assert torch.equal(got, want)
    assert 0 < int(want.sum()) < rows * cols or rows * cols < 16  # a real mix, not all-kept


def test_host_mask_p_one_drops_everything(mask_check):
    _, got = mask_check("vec8", 5, 4, 12, 1.0)
    assert not got.any()


@pytest.mark.parametrize("seed,rows,cols,p,row_offset", CASES)
def test_host_mask_packed_equals_triton_and_reference_bits(mask_check, seed, rows, cols, p,
                                                           row_offset):
    """The packed mask (#13 item 4) is one definition: the CUDA header's mask packed by the
    reference == the reference's bits == the bytes Triton's forward writes. (The CUDA kernels
    still redraw from the seed; they read the same bits the Triton forward saves.)"""
    triton_dropout = pytest.importorskip("lora_kernels.triton.dropout")
    _, host = mask_check("quad", seed, rows, cols, p, row_offset)
    want = ref.dropout_keep_packed(seed, rows, cols, p, row_offset=row_offset)
    assert torch.equal(ref.pack_keep_bits(host), want)
    host_bytes = mask_check("bits", seed, rows, cols, p, row_offset)  # philox.h's keep_byte
    assert torch.equal(host_bytes.to(torch.uint8), want)
    assert torch.equal(triton_dropout.dropout_keep_packed(seed, rows, cols, p,
                                                          row_offset=row_offset), want)
