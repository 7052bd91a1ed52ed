"""``patch_peft_model``: run a PEFT LoRA model on lora-kernels' fused ops, in one call.

Every PEFT ``lora.Linear`` whose base layer is an ``nn.Linear`` or a transformers ``Conv1D`` gets
an instance-level ``forward`` that follows PEFT's own ``Linear.forward`` branch by branch
(disabled adapters, merged weights, active adapters, ``adapter_names=`` mixed batches) but
computes the LoRA layers with :func:`lora_kernels.lora_linear` (base GEMM and low-rank term in
one op) and :func:`lora_kernels.multi_lora_linear` (one grouped op for a mixed batch).

PEFT keeps owning everything else: its parameters (gradients land in them), ``set_adapter``,
``merge``/``unmerge``, ``disable_adapter()``, saving. DoRA adapters run on
:func:`lora_kernels.dora_linear` (see peft_dora.py). What we do not accelerate - the other
LoRA variants, ``lora_bias``, non-Linear targets (Embedding, Conv), quantized or wrapped
base layers, autocast-free dtype mismatches - keeps PEFT's forward, with one warning naming the
layer and the reason. ``handle.unpatch()`` deletes the instance attributes we added, so the
layers are exactly PEFT's again (same outputs, bit for bit).

A patched model can be ``copy.deepcopy``'d, pickled and ``torch.save``'d: the instance
attributes are plain ``functools.partial`` objects over module-level functions, and the caches
drop their lock and contents when copied. A copy is patched on its own, independent of the
original; ``PeftPatchHandle.of(copy)`` gives a handle for it.
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_kernels.integrations import peft_dora
from lora_kernels.integrations.peft_joint import JointState, train_stack
from lora_kernels.integrations.peft_mixed import BatchCache, StackCache, needs_grad
from lora_kernels.integrations.peft_moe import patch_moe_blocks
from lora_kernels.integrations import peft_fp8, peft_qlora
from lora_kernels.nn.lora_linear import check_backend, is_conv1d
from lora_kernels.ops import lora_linear, lora_linear_fp8, lora_linear_nf4, multi_lora_linear

_ATTR = "_lora_kernels_patch"


class LoRAKernelsFallbackWarning(UserWarning):
    """A PEFT layer (or one of its adapters) keeps PEFT's own forward; the message says why."""


class _PatchShared:
    """What the layers of one patch share: the backend, the mixed-batch cache, the reasons of the
    skipped layers and the warnings already given.

    The layers reference this, not the handle: a handle lists every patched layer, so a layer
    that pointed at it would drag the whole model along when copied or pickled on its own.
    """

    def __init__(self, backend: str):
        self.backend = backend
        self.batches = BatchCache()
        self.skipped: dict[str, str] = {}
        self.warned: set = set()
        self.joint = JointState()  # adapter_names= in training mode (peft_joint.py)

    def warn_once(self, layer_name: str, reason: str) -> None:
        key = (layer_name, reason)
        if key in self.warned:
            return
        self.warned.add(key)
        warnings.warn(f"lora-kernels: PEFT layer '{layer_name}' keeps PEFT's own forward: {reason}",
                      LoRAKernelsFallbackWarning, stacklevel=3)


class _LayerState:
    """What the patched forward of one layer needs besides the layer itself."""

    __slots__ = ("name", "shared", "conv1d", "stack", "concat", "peft_forward")

    def __init__(self, name: str, shared: _PatchShared, conv1d: bool, peft_forward):
        self.name, self.shared, self.conv1d = name, shared, conv1d
        self.stack = StackCache()  # mixed batches (adapter_names=)
        self.concat = StackCache(concat_adapters)  # several active adapters
        # functools.partial, not a bound method: a bound method pickles as getattr(layer,
        # "forward"), which after loading would find our patched forward, not PEFT's.
        self.peft_forward = peft_forward


class PeftPatchHandle:
    """Returned by :func:`patch_peft_model`. ``unpatch()`` (or leaving a ``with`` block) restores
    PEFT exactly.

    * ``patched``: ``{name: layer}`` whose forward is ours. A patched layer can still run one of
      its adapters on PEFT's forward (DoRA, ``lora_bias``...): :meth:`adapter_status` says, per
      adapter, which are fused and why the others are not; ``fallback_adapters`` lists only those.
    * ``skipped``: ``{name: reason}`` for LoRA layers left wholly on PEFT's forward.
    * :meth:`counts` sums these up (it is what ``repr`` prints).

    A deep copy (or an unpickled copy) of a patched model is patched on its own;
    :meth:`of` gives a handle for it.
    """

    def __init__(self, model: nn.Module, shared: _PatchShared,
                 patched: Optional[dict[str, nn.Module]] = None):
        self.model = model
        self._shared = shared
        self.patched: dict[str, nn.Module] = {} if patched is None else patched
        self.active = True

    backend = property(lambda self: self._shared.backend)
    skipped = property(lambda self: self._shared.skipped, doc="``{layer: reason}``")
    batches = property(lambda self: self._shared.batches)
    joint = property(lambda self: self._shared.joint)

    @classmethod
    def of(cls, model: nn.Module) -> Optional["PeftPatchHandle"]:
        """A handle on the patch of ``model``'s layers, found from the layers themselves (so it
        works for a ``copy.deepcopy`` or a ``torch.load`` of a patched model), or None if no
        layer of ``model`` is patched. Names are relative to ``model``."""
        found = [(n, m) for n, m in model.named_modules() if _ATTR in m.__dict__]
        if not found:
            return None
        shared = found[0][1].__dict__[_ATTR].shared
        shared.joint.install(model)  # a copy's tuners carry our hook; its JointState forgot them
        return cls(model, shared, {n: m for n, m in found if m.__dict__[_ATTR].shared is shared})

    def adapter_status(self) -> dict[str, dict[str, Optional[str]]]:
        """``{layer: {adapter: None if it runs on our fused ops, else the reason it runs on PEFT's
        forward}}`` for every adapter of every patched layer, computed now (so adapters added
        or deleted after patching are counted too)."""
        return {name: {a: _adapter_reason(layer, a) for a in layer.lora_A}
                for name, layer in self.patched.items()}

    @property
    def fallback_adapters(self) -> dict[str, dict[str, str]]:
        """``{layer: {adapter: reason}}``: adapters of patched layers that keep PEFT's forward."""
        out = {}
        for name, status in self.adapter_status().items():
            falls = {a: why for a, why in status.items() if why is not None}
            if falls:
                out[name] = falls
        return out

    def counts(self) -> dict[str, int]:
        """Layers and adapters by what runs them: ``layers_patched`` (= fully fused + with a
        fallback adapter), ``layers_fully_fused``, ``layers_with_fallback_adapters``,
        ``layers_skipped``, ``adapters_fused``, ``adapters_fallback`` (adapters of patched layers;
        those of skipped layers all run on PEFT)."""
        status = self.adapter_status()
        falls = sum(1 for s in status.values() if any(w is not None for w in s.values()))
        return {"layers_patched": len(status), "layers_fully_fused": len(status) - falls,
                "layers_with_fallback_adapters": falls, "layers_skipped": len(self.skipped),
                "adapters_fused": sum(w is None for s in status.values() for w in s.values()),
                "adapters_fallback": sum(w is not None for s in status.values()
                                         for w in s.values())}

    def unpatch(self) -> None:
        """Give every patched layer back its class ``forward``; idempotent."""
        for layer in self.patched.values():
            layer.__dict__.pop("forward", None)
            layer.__dict__.pop(_ATTR, None)
        self.patched.clear()
        self.batches.clear()
        self.joint.uninstall()
        self.active = False

    def __enter__(self) -> "PeftPatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        c = self.counts()
        return (f"PeftPatchHandle(patched={c['layers_patched']} layers "
                f"({c['layers_with_fallback_adapters']} with adapters on PEFT's forward: "
                f"{c['adapters_fused']} adapters fused, {c['adapters_fallback']} not), "
                f"skipped={c['layers_skipped']} layers, backend={self.backend!r}, "
                f"active={self.active})")


# ------------------------------------------------------------------------------------------
# Which layers and adapters we can run
# ------------------------------------------------------------------------------------------
def _base_reason(layer: nn.Module) -> Optional[str]:
    """None if the layer's base is a plain ``nn.Linear``/``Conv1D`` we may bypass, else why not."""
    base = layer.base_layer
    if layer.get_base_layer() is not base:
        return "its base layer is wrapped by another adapter layer (nested tuners)"
    if peft_qlora.is_nf4_base(base):  # QLoRA: fused from the 4-bit storage (peft_qlora.py)
        return peft_qlora.base_reason(base)
    if peft_fp8.is_fp8_base(base):  # an FP8Linear (register_fp8_lora): the fp8 op (peft_fp8.py)
        return peft_fp8.base_reason(base)
    if is_conv1d(base):
        ok = type(base).__module__.startswith("transformers")
    else:
        ok = isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward
    if not ok:
        return (f"base layer type {type(base).__name__} is not a plain nn.Linear or transformers "
                f"Conv1D (quantized or custom linears are not fused)")
    if base._forward_hooks or base._forward_pre_hooks:
        return "its base layer has forward hooks, which the fused op would skip"
    if getattr(base.weight, "dim", lambda: 0)() != 2:
        return "its base weight is not a 2-D tensor"
    return None


def _adapter_reason(layer: nn.Module, adapter: str) -> Optional[str]:
    """None if adapter ``adapter`` of ``layer`` is plain LoRA we compute, else why not."""
    if adapter in getattr(layer, "lora_variant", {}):
        variant = type(layer.lora_variant[adapter]).__name__
        if not peft_dora.is_dora(layer, adapter):
            return f"adapter '{adapter}' is a LoRA variant ({variant}), which is not fused"
        why = peft_dora.dora_reason(layer, adapter)  # DoRA runs on dora_linear
        if why is not None:
            return why
    if layer.lora_bias.get(adapter, False):
        return f"adapter '{adapter}' has lora_bias=True, which is not fused"
    drop = layer.lora_dropout[adapter]
    if not isinstance(drop, (nn.Dropout, nn.Identity)) or \
            (isinstance(drop, nn.Dropout) and type(drop) is not nn.Dropout):
        return f"adapter '{adapter}' has a custom dropout module {type(drop).__name__}"
    return None


def _dropout_p(layer: nn.Module, adapter: str) -> float:
    drop = layer.lora_dropout[adapter]
    return float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0


# ------------------------------------------------------------------------------------------
# The forward
# ------------------------------------------------------------------------------------------
def _fallback(self, st: _LayerState, reason: str, x, args, kwargs):
    st.shared.warn_once(st.name, reason)
    return st.peft_forward(x, *args, **kwargs)


def _patched_forward(self, x: Tensor, *args, **kwargs):
    """PEFT ``lora.Linear.forward``, branch for branch, with the LoRA math on our ops."""
    st: _LayerState = self.__dict__[_ATTR]
    extra = {k for k, v in kwargs.items() if k != "adapter_names" and v is not None}
    if args or extra:
        return _fallback(self, st, f"extra forward arguments ({len(args)} positional, "
                         f"keywords {sorted(extra)})", x, args, kwargs)
    # PEFT's own errors, word for word (except its refusal of DoRA in mixed batches, which run here)
    self._check_forward_args(x, **peft_dora.check_kwargs(self, kwargs))
    adapter_names = kwargs.get("adapter_names")
    if self.disable_adapters:
        if self.merged:
            self.unmerge()  # PEFT does this too: a disabled layer is never left merged
        return self.base_layer(x)
    if adapter_names is not None:
        return _mixed_forward(self, st, x, adapter_names, kwargs)
    if self.merged:
        return self.base_layer(x)
    active = [a for a in self.active_adapters if a in self.lora_A]
    if not active:
        return self.base_layer(x)
    for a in active:
        reason = _adapter_reason(self, a)
        if reason is not None:
            return _fallback(self, st, reason, x, args, kwargs)
    reason = peft_dora.active_reason(self, active)
    if reason is not None:
        return _fallback(self, st, reason, x, args, kwargs)
    if peft_qlora.is_nf4_base(self.base_layer):
        if any(peft_dora.is_dora(self, a) for a in active):  # dora_linear reads a dense W0 only
            return _fallback(self, st, "DoRA over a bitsandbytes 4-bit base is not fused", x,
                             args, kwargs)
        weight, bias, x_c = peft_qlora.base_operands(self, x)
        if isinstance(weight, str):
            return _fallback(self, st, weight, x, args, kwargs)
        return _fused(self, st, x_c, weight, bias, active).to(x.dtype)
    if peft_fp8.is_fp8_base(self.base_layer):
        if any(peft_dora.is_dora(self, a) for a in active):
            return _fallback(self, st, "DoRA over an FP8 base is not fused", x, args, kwargs)
        weight, bias, x_c = peft_fp8.base_operands(self, x)
        return _fused(self, st, x_c, weight, bias, active).to(x.dtype)
    weight, bias, x_c = _base_operands(self, st, x)
    if weight is None:
        return _fallback(self, st, f"input dtype {x.dtype} differs from the base weight's "
                         f"{self.base_layer.weight.dtype} (outside autocast)", x, args, kwargs)
    if peft_dora.is_dora(self, active[0]):
        return peft_dora.active_forward(self, x_c, weight, bias, active, st.shared.backend)
    return _fused(self, st, x_c, weight, bias, active)


def _base_operands(self, st: _LayerState, x: Tensor):
    """``(weight [N, K], bias, x)`` in one compute dtype, or ``(None, None, None)`` if PEFT's
    forward must handle the dtypes. Under autocast the operands are cast the way autocast
    casts ``F.linear``'s (our custom op has no autocast rule of its own)."""
    base = self.base_layer
    weight = base.weight.t() if st.conv1d else base.weight
    bias = base.bias
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point():
        dt = torch.get_autocast_dtype(dev)
        return weight.to(dt), (None if bias is None else bias.to(dt)), x.to(dt)
    if x.dtype != weight.dtype:
        return None, None, None
    return weight, bias, x


def _fused(self, st: _LayerState, x: Tensor, weight: Tensor, bias: Optional[Tensor],
           active: list) -> Tensor:
    backend = st.shared.backend
    drops = [_dropout_p(self, a) for a in active]
    fused_op = lora_linear_nf4 if isinstance(weight, peft_qlora.NF4Weight) else lora_linear
    if isinstance(weight, peft_fp8.FP8Weight):  # the base's activation quantization, if any
        fused_op = functools.partial(lora_linear_fp8, act_quant=self.base_layer.act_quant)
    if len(active) == 1:
        a = active[0]
        return fused_op(x, weight, bias, self.lora_A[a].weight, self.lora_B[a].weight,
                        scaling=float(self.scaling[a]), dropout_p=drops[0],
                        training=drops[0] > 0.0, backend=backend)
    if not any(drops):
        # Several adapters, no dropout: one fused op with their ranks side by side. Built afresh
        # when autograd reaches the factors (or under torch.compile, where the cache's checks
        # would break the graph), else reused until one of them changes.
        if needs_grad(self, active) or torch.compiler.is_compiling():
            lora_a, lora_b = concat_adapters(self, active, x.dtype, x.device)
        else:
            lora_a, lora_b = st.concat.get(self, active, x.dtype, x.device)
        return fused_op(x, weight, bias, lora_a, lora_b, scaling=1.0, training=False,
                        backend=backend)
    # With dropout each adapter draws its own mask (PEFT's semantics): the first adapter is
    # fused with the base GEMM, the others add their low-rank terms PEFT's way.
    a0 = active[0]
    y = fused_op(x, weight, bias, self.lora_A[a0].weight, self.lora_B[a0].weight,
                 scaling=float(self.scaling[a0]), dropout_p=drops[0],
                 training=drops[0] > 0.0, backend=backend)
    for a in active[1:]:
        xa = self.lora_dropout[a](x.to(self.lora_A[a].weight.dtype))
        y = y + (self.lora_B[a](self.lora_A[a](xa)) * float(self.scaling[a])).to(y.dtype)
    return y


def concat_adapters(layer: nn.Module, adapters, dtype: torch.dtype, device: torch.device
                    ) -> tuple[Tensor, Tensor]:
    """``(lora_a [sum r, K], lora_b [N, sum r])``: the adapters' ranks side by side, each
    scaling folded into its B columns; torch.cat keeps gradients flowing to every factor."""
    lora_a = torch.cat([layer.lora_A[a].weight.to(device=device, dtype=dtype) for a in adapters],
                       dim=0)
    lora_b = torch.cat([layer.lora_B[a].weight.to(device=device, dtype=dtype) *
                        float(layer.scaling[a]) for a in adapters], dim=1)
    return lora_a, lora_b


def _mixed_forward(self, st: _LayerState, x: Tensor, adapter_names, kwargs) -> Tensor:
    used = {n for n in adapter_names if n in self.lora_A}
    for a in sorted(used):
        reason = _adapter_reason(self, a)
        if reason is not None:
            return _fallback(self, st, reason, x, (), kwargs)
    quant = peft_qlora if peft_qlora.is_nf4_base(self.base_layer) else \
        peft_fp8 if peft_fp8.is_fp8_base(self.base_layer) else None
    if quant is not None:
        # NF4 / FP8 base + each token's adapter in one multi_lora_linear over the storage
        reason = quant.mixed_reason(self, used)
        weight, bias, x_c = (reason, None, None) if reason else quant.base_operands(self, x)
        if isinstance(weight, str):
            return _fallback(self, st, weight, x, (), kwargs)
        if x_c.dim() < 2:
            return _fallback(self, st, "a mixed batch needs a [batch, ..., features] input", x,
                             (), kwargs)
        if x_c.shape[0] == 0 or all(n not in self.lora_A for n in adapter_names):
            return self.base_layer(x)  # no adapter work: the base's own forward
        return _mixed_plain(self, st, x_c, weight, bias, adapter_names).to(x.dtype)
    weight, bias, x_c = _base_operands(self, st, x)
    if weight is None:
        return _fallback(self, st, f"input dtype {x.dtype} differs from the base weight's "
                         f"{self.base_layer.weight.dtype} (outside autocast)", x, (), kwargs)
    if x_c.dim() < 2:
        return _fallback(self, st, "a mixed batch needs a [batch, ..., features] input", x, (),
                         kwargs)
    if x_c.shape[0] == 0:
        return F.linear(x_c, weight, bias)
    if any(peft_dora.is_dora(self, a) for a in used):
        return peft_dora.mixed_forward(
            self, x_c, weight, bias, adapter_names, st.shared.backend,
            lambda xs, names: _mixed_plain(self, st, xs, weight, bias, names))
    return _mixed_plain(self, st, x_c, weight, bias, adapter_names)


def _mixed_plain(self, st: _LayerState, x_c: Tensor, weight: Tensor, bias: Optional[Tensor],
                 adapter_names) -> Tensor:
    """A mixed batch of plain LoRA adapters (and ``__base__``) on the grouped op."""
    tokens_per_sample = x_c[0].numel() // x_c.shape[-1]
    slot_names, batch = st.shared.batches.get(adapter_names, tokens_per_sample, x_c.device)
    if not slot_names:  # every sample on "__base__": no stack to build (S = 0)
        return F.linear(x_c, weight, bias)
    if needs_grad(self, slot_names):  # a training step: the stack stays in the autograd graph
        lora_a, lora_b, scalings, ranks = train_stack(st.shared.joint, self, slot_names,
                                                      x_c.dtype, x_c.device)
    else:
        lora_a, lora_b, scalings, ranks = st.stack.get(self, slot_names, x_c.dtype, x_c.device)
    # each slot's own dropout (PEFT: each adapter's nn.Dropout on its own sub-batch), 0 in eval
    drops = [_dropout_p(self, n) if n in self.lora_A else 0.0 for n in slot_names]
    return multi_lora_linear(x_c, weight, bias, lora_a, lora_b, batch, scalings=scalings,
                             ranks=ranks, backend=st.shared.backend,
                             dropout_p=drops if any(drops) else None)


# ------------------------------------------------------------------------------------------
# Public entry
# ------------------------------------------------------------------------------------------
def patch_peft_model(model: nn.Module, *, backend: str = "auto") -> PeftPatchHandle:
    """Run every PEFT LoRA ``Linear`` layer of ``model`` on lora-kernels' fused ops.

    ``model``: a ``PeftModel`` (or any module containing PEFT LoRA layers). Training
    forward/backward, inference, ``set_adapter``, ``disable_adapter()``, merged/unmerged
    states, rsLoRA scaling, dropout, several adapters and PEFT's mixed batches
    (``model(..., adapter_names=[...])``, ``"__base__"`` included) all keep PEFT's semantics.
    Layers or adapters we do not accelerate keep PEFT's forward with one
    ``LoRAKernelsFallbackWarning`` naming the layer and the reason. Returns a handle;
    ``handle.unpatch()`` restores PEFT exactly. Layers added later (``add_adapter`` on new
    modules) are not patched: patch again after unpatching.
    """
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError as exc:  # pragma: no cover - peft is an optional extra
        raise ImportError("patch_peft_model needs PEFT: pip install 'lora-kernels[peft]'") from exc
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a PeftModel), got "
                        f"{type(model).__name__}")
    check_backend(backend)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, lora_layer.LoraLayer)]
    if not layers:
        raise ValueError("patch_peft_model found no PEFT LoRA layers in the model "
                         "(expected a PeftModel from peft.get_peft_model with a LoraConfig)")
    # Every check before any change: a rejected call leaves no layer half-patched.
    for name, module in layers:
        if _ATTR in module.__dict__:
            raise ValueError(f"layer '{name}' is already patched; call handle.unpatch() on the "
                             f"earlier handle first")
    shared = _PatchShared(backend)
    handle = PeftPatchHandle(model, shared)
    # ParamWrappers (target_parameters) of recognised MoE experts blocks: integrations/peft_moe.
    moe_taken = patch_moe_blocks(model, handle, shared, lora_layer)
    for name, module in layers:
        if name in moe_taken:
            continue
        reason = None
        plain = isinstance(module, lora_layer.Linear) and \
            type(module).forward is lora_layer.Linear.forward
        if not (plain or peft_qlora.is_peft_bnb_4bit(module)):
            reason = (f"{type(module).__module__}.{type(module).__name__} layers are not "
                      f"accelerated (only lora.Linear over nn.Linear / Conv1D / Linear4bit / "
                      f"FP8Linear and PEFT's bnb Linear4bit)")
        elif "forward" in module.__dict__:
            reason = "its forward is already wrapped on the instance by another library"
        else:
            reason = _base_reason(module)
        if reason is not None:
            handle.skipped[name] = reason
            # A LoRA layer class of the user's own (registered with PEFT's custom-module dispatch)
            # runs the user's forward by design: recorded, not warned about. PEFT itself warns
            # about such layers ("Unsupported layer type ..."), and ours must not displace it.
            if type(module).__module__.split(".")[0] == "peft":
                shared.warn_once(name, reason)
            continue
        for adapter in module.lora_A:
            why = _adapter_reason(module, adapter)
            if why is not None:  # the layer is patched; this adapter alone falls back
                shared.warn_once(name, why)
        st = _LayerState(name, shared, is_conv1d(module.base_layer),
                         functools.partial(type(module).forward, module))
        module.__dict__[_ATTR] = st
        module.__dict__["forward"] = functools.partial(_patched_forward, module)
        handle.patched[name] = module
    handle.joint.install(model)
    return handle
