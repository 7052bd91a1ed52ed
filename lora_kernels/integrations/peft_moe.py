"""PEFT ``target_parameters`` LoRA on transformers MoE experts, run on :func:`moe_lora_linear`.

PEFT wraps each targeted expert parameter in a ``ParamWrapper`` (nested when both
``gate_up_proj`` and ``down_proj`` are targeted) whose forward folds ``W_e + s·B_e·A_e`` for
*every* expert into an ``[E, out, in]`` tensor on every call and then runs the experts
module on it. For the experts blocks we recognise (transformers' fused layout: ``gate_up_proj
[E, 2I, H]``, ``down_proj [E, H, I]``, ``_apply_gate``, no bias; Qwen3-MoE, Mixtral, ...) the
outermost wrapper gets an instance ``forward`` that computes the block directly:

    gate_up = moe_lora_linear(x, W_gu, ids, A_gu, B_gu)         # [T, k, 2I]
    h       = experts._apply_gate(gate_up)                       # [T, k, I]
    y       = moe_lora_linear(h, W_down, ids, A_d, B_d, topk_weights=w)   # [T, H]

Same math as PEFT's (LoRA on the weights is LoRA on the products), the LoRA factors stay
PEFT's parameters (gradients land in them), and nothing expert-weight-sized is built.
Disabled adapters, merged weights and ``adapter_names=`` keep PEFT's forward (it does the
right thing there, without the fold). Several active adapters run as one op with their ranks
side by side (each scaling folded into its B). Anything else falls back to PEFT with one
``LoRAKernelsFallbackWarning``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from lora_kernels.ops import moe_lora_linear

# Experts classes whose forward is "gate_up -> _apply_gate -> down, gate-weighted sum".
KNOWN_EXPERTS = ("Qwen3MoeExperts", "MixtralExperts", "Qwen2MoeExperts", "OlmoeExperts")
_PARAMS = ("gate_up_proj", "down_proj")


class _MoeState:
    # ``shared`` (the patch's backend, warnings and skipped reasons, peft._PatchShared), not
    # the handle: as for the Linear layers, a block that pointed at the handle would drag the
    # whole model along when copied or pickled alone, and PeftPatchHandle.of finds it by it.
    __slots__ = ("name", "shared", "experts", "wrappers", "peft_forward")

    def __init__(self, name, shared, experts, wrappers, peft_forward):
        self.name, self.shared, self.experts = name, shared, experts
        self.wrappers = wrappers  # {parameter_name: ParamWrapper}
        self.peft_forward = peft_forward


def _chain(outer, param_wrapper_cls):
    """``({parameter_name: wrapper}, experts module)`` of a nest of ParamWrappers."""
    wrappers, m = {}, outer
    while isinstance(m, param_wrapper_cls):
        wrappers[m.parameter_name] = m
        m = m.base_layer
    return wrappers, m


def experts_reason(experts: nn.Module, wrappers: dict) -> Optional[str]:
    """None if we can run this experts block, else why not."""
    cls = type(experts).__name__
    if cls not in KNOWN_EXPERTS:
        return f"experts class {cls} is not a recognised transformers MoE block"
    flags = dict(has_gate=True, has_bias=False, is_transposed=False, is_concatenated=True,
                 has_post_expert_norm=False, _is_expert_parallel=False)
    for flag, want in flags.items():
        if getattr(experts, flag, want) != want:
            return f"experts block {cls} has {flag}={getattr(experts, flag)!r}"
    if set(wrappers) - set(_PARAMS):
        return f"targeted expert parameters {sorted(set(wrappers) - set(_PARAMS))} are not fused"
    for p in _PARAMS:
        w = getattr(experts, p, None)
        if not isinstance(w, torch.Tensor) or w.dim() != 3:
            return f"experts block {cls} has no 3-D {p}"
    if experts._forward_hooks or experts._forward_pre_hooks:
        return "its experts block has forward hooks, which the fused op would skip"
    for name, wr in wrappers.items():
        if not wr._did_swap_in_out_features:
            return f"{name} is not stored as [experts, out, in]"
    return None


def _factors(wr, adapters, dtype):
    """``(A [E, Σr, K], B [E, N, Σr])`` of the active adapters of one ParamWrapper, scalings
    folded into B (1.0 overall); differentiable views of PEFT's parameters."""
    E = wr.num_experts
    a_list, b_list = [], []
    for a in adapters:
        wa, wb = wr.lora_A[a].weight, wr.lora_B[a].weight
        a_list.append(wa.reshape(E, -1, wa.shape[-1]).to(dtype))
        b = wb.reshape(wb.shape[0], -1, E).permute(2, 0, 1).to(dtype)
        b_list.append(b * float(wr.scaling[a]))
    if len(adapters) == 1:
        return a_list[0], b_list[0]
    return torch.cat(a_list, 1), torch.cat(b_list, 2)


def _fallback(self, st, reason, args, kwargs):
    if reason:
        st.shared.warn_once(st.name, reason)
    return st.peft_forward(*args, **kwargs)


def _moe_forward(self, *args, **kwargs):
    st: _MoeState = self.__dict__["_lora_kernels_patch"]
    if kwargs or len(args) != 3:
        return _fallback(self, st, "" if "adapter_names" in kwargs else
                         f"unexpected experts call ({len(args)} positional, keywords "
                         f"{sorted(kwargs)})", args, kwargs)
    hidden, ids, gate_w = args
    wrappers = list(st.wrappers.values())
    if any(w.disable_adapters or w.merged for w in wrappers):
        return st.peft_forward(*args)  # PEFT's forward: base experts (unmerging first)
    ex = st.experts
    w_gu, w_d = ex.gate_up_proj, ex.down_proj
    if hidden.dtype != w_gu.dtype or torch.is_autocast_enabled(hidden.device.type):
        return _fallback(self, st, f"input dtype {hidden.dtype} vs expert weights "
                         f"{w_gu.dtype} (or autocast) is not fused", args, kwargs)
    if torch.is_grad_enabled() and (w_gu.requires_grad or w_d.requires_grad):
        return _fallback(self, st, "the expert weights require grad (the fused op trains "
                         "LoRA factors only)", args, kwargs)
    lora = {}
    for p in _PARAMS:
        wr = st.wrappers.get(p)
        active = [] if wr is None else [a for a in wr.active_adapters if a in wr.lora_A]
        W = getattr(ex, p)
        if active:
            lora[p] = _factors(wr, active, hidden.dtype)
        else:  # untargeted (or no active adapter here): the base experts, a rank-0 term
            lora[p] = (W.new_zeros(W.shape[0], 0, W.shape[2]), W.new_zeros(*W.shape[:2], 0))
    backend = st.shared.backend
    shape = hidden.shape
    x = hidden.reshape(-1, shape[-1])
    gate_up = moe_lora_linear(x, w_gu, ids, *lora["gate_up_proj"], scaling=1.0, backend=backend)
    h = ex._apply_gate(gate_up)
    y = moe_lora_linear(h, w_d, ids, *lora["down_proj"], scaling=1.0, topk_weights=gate_w,
                        backend=backend)
    return y.to(hidden.dtype).reshape(shape)


def patch_moe_blocks(model: nn.Module, handle, shared, lora_layer) -> set:
    """Patch the outermost ParamWrapper of every recognised experts block; returns the names
    of every ParamWrapper we took over (patched or covered by a patched outer one). Blocks we
    cannot run are left to the caller (they keep PEFT's forward with the usual warning)."""
    pw = lora_layer.ParamWrapper
    modules = dict(model.named_modules())
    inner = {id(m.base_layer) for m in modules.values() if isinstance(m, pw)}
    taken = set()
    for name, m in modules.items():
        if not isinstance(m, pw) or id(m) in inner:
            continue
        wrappers, experts = _chain(m, pw)
        reason = experts_reason(experts, wrappers)
        if reason is None and ("forward" in m.__dict__ or "_lora_kernels_patch" in m.__dict__):
            reason = "its forward is already wrapped on the instance by another library"
        if reason is not None:
            shared.skipped[name] = reason
            shared.warn_once(name, reason)
            taken.update(n for n, x in modules.items() if any(x is w for w in wrappers.values()))
            continue
        # functools.partial, not bound methods: they pickle and deep-copy (see peft.py)
        st = _MoeState(name, shared, experts, wrappers, functools.partial(type(m).forward, m))
        m.__dict__["_lora_kernels_patch"] = st
        m.__dict__["forward"] = functools.partial(_moe_forward, m)
        handle.patched[name] = m
        taken.update(n for n, x in modules.items() if any(x is w for w in wrappers.values()))
    return taken
