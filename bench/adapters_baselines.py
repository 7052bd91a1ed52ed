"""The adapter baselines of the LoRA paper's Table 1, attached to a transformers GPT-2 with hooks.

LoRA paper §5.1 (and §7, Appendix B): "Adapter tuning as proposed in Houlsby et al. (2019)
inserts adapter layers between the self-attention module (and the MLP module) and the
subsequent residual connection. There are two fully connected layers with biases in an adapter
layer with a nonlinearity in between. We call this original design AdapterH. [...] Lin et al.
(2020) proposed a more efficient design with the adapter layer applied only after the MLP module
and after a LayerNorm. We call it AdapterL."

* **AdapterH** (Houlsby et al. 2019): two adapters per block, one on the attention output after
  its projection and one on the MLP output, each *before* the residual add:
  ``h ← h + W_up·gelu(W_down·h + b_down) + b_up`` (Houlsby's own code uses GELU and an internal
  skip connection, so a near-zero adapter is the identity).
* **AdapterL** (Lin et al. 2020): one adapter per block at the end of the block (after the MLP's
  residual add) with its own LayerNorm: ``h ← h + W_up·relu(W_down·LN(h) + b_down) + b_up``.

Both run sequentially after the sub-layer they adapt: that extra depth, not their FLOPs, is what
makes them slow at small batch (the paper's point). The bottleneck size ``b`` is chosen so the
whole model's adapter parameters hit a budget (Table 1: 0.5M and 11M on GPT-2 medium).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F


class BottleneckAdapter(nn.Module):
    """``h + up(act(down(norm(h))))`` — down ``[b, d]`` and up ``[d, b]`` with biases."""

    def __init__(self, d: int, b: int, activation: str = "gelu", layer_norm: bool = False,
                 init_std: float = 1e-3, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(d, **factory) if layer_norm else None
        self.down = nn.Linear(d, b, **factory)
        self.up = nn.Linear(b, d, **factory)
        self.activation = activation
        # Near-identity init (Houlsby §2.1): small weights, zero biases.
        with torch.no_grad():
            for lin in (self.down, self.up):
                nn.init.normal_(lin.weight, std=init_std)
                nn.init.zeros_(lin.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.norm(h) if self.norm is not None else h
        z = self.down(z)
        z = F.gelu(z) if self.activation == "gelu" else F.relu(z)
        return h + self.up(z)


def adapter_params(d: int, b: int, layer_norm: bool) -> int:
    return 2 * d * b + b + d + (2 * d if layer_norm else 0)


def adapters_per_block(kind: str) -> int:
    return {"H": 2, "L": 1}[_check_kind(kind)]


def _check_kind(kind: str) -> str:
    if kind not in ("H", "L"):
        raise ValueError(f"adapter kind must be 'H' (Houlsby) or 'L' (Lin et al.), got {kind!r}")
    return kind


def bottleneck_for_budget(kind: str, d: int, n_layer: int, budget: float) -> int:
    """The bottleneck ``b`` whose total adapter parameter count is closest to ``budget``."""
    n = n_layer * adapters_per_block(kind)
    ln = kind == "L"
    fixed = d + (2 * d if ln else 0)  # up bias + LayerNorm, independent of b
    b = round((budget / n - fixed) / (2 * d + 1))
    return max(1, int(b))


def total_adapter_params(kind: str, d: int, n_layer: int, b: int) -> int:
    return n_layer * adapters_per_block(kind) * adapter_params(d, b, kind == "L")


def gpt2_blocks(model: nn.Module):
    """The ``GPT2Block`` list of a ``GPT2LMHeadModel`` / ``GPT2Model``."""
    core = getattr(model, "transformer", model)
    blocks = getattr(core, "h", None)
    if blocks is None:
        raise TypeError(f"expected a transformers GPT-2 model, got {type(model).__name__}")
    return blocks


def _replace_first(out, new_first):
    """Sub-modules return a tensor or a tuple whose first item is the hidden state."""
    if isinstance(out, tuple):
        return (new_first,) + tuple(out[1:])
    return new_first


def _first(out):
    return out[0] if isinstance(out, tuple) else out


class AttachedAdapters:
    """Handle returned by :func:`attach_adapters`: the adapters (registered as sub-modules of
    their blocks, so ``.to()`` and ``parameters()`` see them) and their forward-hook handles."""

    def __init__(self, kind: str, bottleneck: int, modules: list, handles: list):
        self.kind, self.bottleneck = kind, bottleneck
        self.modules, self.handles = modules, handles

    @property
    def num_params(self) -> int:
        return sum(p.numel() for m in self.modules for p in m.parameters())


def attach_adapters(model: nn.Module, kind: str, bottleneck: int,
                    device=None, dtype=None) -> AttachedAdapters:
    """Put AdapterH (``kind="H"``) or AdapterL (``kind="L"``) adapters on every GPT-2 block
    via forward hooks; the model's own code is untouched."""
    _check_kind(kind)
    blocks = gpt2_blocks(model)
    ref = next(model.parameters())
    device, dtype = device or ref.device, dtype or ref.dtype
    d = model.config.n_embd
    modules, handles = [], []

    def hook(adapter):
        return lambda _mod, _inp, out: _replace_first(out, adapter(_first(out)))

    for block in blocks:
        if kind == "H":
            # After attention's output projection and after the MLP, before each residual add.
            for where, sub in (("adapter_attn", block.attn), ("adapter_mlp", block.mlp)):
                ad = BottleneckAdapter(d, bottleneck, "gelu", False, device=device, dtype=dtype)
                block.add_module(where, ad)
                handles.append(sub.register_forward_hook(hook(ad)))
                modules.append(ad)
        else:
            # At the end of the block (after the MLP's residual add), with its own LayerNorm.
            ad = BottleneckAdapter(d, bottleneck, "relu", True, device=device, dtype=dtype)
            block.add_module("adapter_out", ad)
            handles.append(block.register_forward_hook(hook(ad)))
            modules.append(ad)
    return AttachedAdapters(kind, bottleneck, modules, handles)


def attach_for_budget(model: nn.Module, kind: str, budget: float) -> AttachedAdapters:
    """:func:`attach_adapters` with the bottleneck that gives ``budget`` adapter parameters."""
    cfg = model.config
    b = bottleneck_for_budget(kind, cfg.n_embd, cfg.n_layer, budget)
    return attach_adapters(model, kind, b)


def describe(kind: str, d: int, n_layer: int, budget: float) -> dict:
    b = bottleneck_for_budget(kind, d, n_layer, budget)
    return {"kind": kind, "bottleneck": b, "params": total_adapter_params(kind, d, n_layer, b),
            "adapters": n_layer * adapters_per_block(kind)}


__all__ = ["AttachedAdapters", "BottleneckAdapter", "attach_adapters", "attach_for_budget",
           "bottleneck_for_budget", "describe", "gpt2_blocks", "total_adapter_params"]


def _selftest(n_layer: int = 24, d: int = 1024) -> Optional[str]:
    """The bottlenecks GPT-2 medium gets for the paper's budgets (``python adapters_baselines.py``)."""
    lines = []
    for budget in (0.5e6, 11e6):
        for kind in ("L", "H"):
            info = describe(kind, d, n_layer, budget)
            lines.append(f"Adapter{kind} budget {budget / 1e6:g}M: b={info['bottleneck']}, "
                         f"{info['params'] / 1e6:.2f}M params in {info['adapters']} adapters")
    return "\n".join(lines)


if __name__ == "__main__":
    print(_selftest())
