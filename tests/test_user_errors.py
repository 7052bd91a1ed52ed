"""Errors a new user met (issue #22): each must name the argument that is wrong and how,
at the call that got it wrong, in one line, without a traceback from deep inside."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels import AdapterPool, cli
from lora_kernels.bench_runner import ORDER


def test_multi_lora_names_lora_b_when_the_stacks_disagree_on_rank():
    batch = lk.LoRABatch.from_adapter_ids(torch.tensor([0, 1, 2, 0, 1]), 3)
    x, w = torch.randn(5, 32), torch.randn(24, 32)
    with pytest.raises(ValueError) as exc:
        lk.multi_lora_linear(x, w, None, torch.randn(3, 8, 32), torch.randn(3, 24, 9), batch,
                             scalings=torch.ones(3))
    msg = str(exc.value)
    assert "lora_b [3, 24, 9]" in msg and "got [3, 8, 32]" in msg
    assert "lora_a and lora_b disagree on r_max" in msg
    with pytest.raises(ValueError, match=r"disagree on the slot count S"):
        lk.multi_lora_linear(x, w, None, torch.randn(2, 9, 32), torch.randn(3, 24, 9), batch,
                             scalings=torch.ones(3))
    # A wrong K is lora_a's own fault alone.
    with pytest.raises(ValueError, match=r"lora_a must have shape .* got \[3, 9, 31\]$"):
        lk.multi_lora_linear(x, w, None, torch.randn(3, 9, 31), torch.randn(3, 24, 9), batch,
                             scalings=torch.ones(3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_unbounded_scalar_errors_do_not_print_infinite_bounds(bad):
    x, w, a, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    with pytest.raises(ValueError) as exc:
        lk.lora_linear(x, w, None, a, b, scaling=bad)
    assert str(exc.value) == f"scaling must be finite, got {bad}"
    with pytest.raises(ValueError, match=r"dropout_p must be finite and in \[0.0, 1.0\), got 1.0"):
        lk.lora_linear(x, w, None, a, b, dropout_p=1.0)


class _Tiny(nn.Module):
    """Embedding-free stand-in for a language model: [batch, seq, features] through one linear."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 4)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("names, tps, words", [
    ([None, None], 5, "tokens_per_sample=5 but each sample has 8 tokens"),
    ([None, None, None], 8, "the names list has 3 entries (one per sample) but the input has 2 "
                            "samples"),
    ([None, None], [3, 4], "tokens_per_sample summing to 7 tokens"),
])
def test_pool_batch_that_does_not_fit_the_input_names_its_argument(names, tps, words):
    model = _Tiny().eval()
    pool = AdapterPool(model, ["proj"], num_slots=1, max_rank=2)
    x = torch.randn(2, 8, 6)
    with pytest.raises(ValueError) as exc, torch.no_grad():
        with pool.batch(names, tokens_per_sample=tps):
            model(x)
    assert words in str(exc.value) and "pool.batch(...)" in str(exc.value)
    # The right batch works, and leaves no explain hook behind once the block ends.
    with torch.no_grad(), pool.batch([None, None], tokens_per_sample=8):
        assert model(x).shape == (2, 8, 4)
    assert model.proj.lora_batch is None and model.proj._explain_batch is None


def test_nested_pool_batches_keep_the_outer_explanation():
    model = _Tiny().eval()
    pool = AdapterPool(model, ["proj"], num_slots=1, max_rank=2)
    with torch.no_grad(), pool.batch([None, None], tokens_per_sample=3):
        with pool.batch([None], tokens_per_sample=8):
            model(torch.randn(1, 8, 6))
        with pytest.raises(ValueError, match="tokens_per_sample=3 but each sample has 8"):
            model(torch.randn(2, 8, 6))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("device, words", [
    ("cuda", "--device cuda: no CUDA device is visible; run with --device cpu"),
    ("gpu", "--device must be cpu or cuda (or cuda:N), got 'gpu'; for a GPU use --device cuda"),
])
def test_demo_on_a_missing_gpu_says_so_in_one_line(capsys, device, words):
    pytest.importorskip("peft")
    assert cli.main(["demo", "--device", device]) == 2
    out = capsys.readouterr()
    assert out.out.strip().splitlines() == [f"lora-kernels demo: {words}"]
    assert "Traceback" not in out.err


def test_cli_help_lists_benchmarks_and_has_no_rst_markup(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert all(name in text for name in ORDER)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "``" not in capsys.readouterr().out
