"""Joint multi-adapter training: PEFT's ``model(..., adapter_names=[...])`` in training mode.

PEFT refuses mixed batches while the model trains (``LoraModel._enable_peft_forward_hooks``:
"Cannot pass `adapter_names` when the model is in training mode"), because its per-adapter loop
was written for inference. Under :func:`~lora_kernels.patch_peft_model` the patched layers run
a mixed batch as one ``multi_lora_linear`` call whose backward gives each adapter exactly the
gradient of its own samples (per-slot sums, ``__base__`` rows touch no adapter), with each
adapter's own rank, scaling and dropout. So while a patch is active, and only then:

* each PEFT tuner (``LoraModel``) gets an instance-level ``_enable_peft_forward_hooks`` that runs
  PEFT's own one (its adapter-name checks, beam-search handling, hook registration) with the
  tuner's *own* ``training`` flag shown as False for the duration of that check. No other
  module's mode changes, so dropout and everything else still train. ``unpatch()`` deletes the
  attribute: PEFT raises again, word for word.
* transformers' gradient checkpointing recomputes a layer during ``backward()``, after PEFT has
  removed its adapter-name hooks; the recompute would silently run the active adapter instead.
  For the forward's duration every checkpointing module's ``_gradient_checkpointing_func`` is
  wrapped so that the function it checkpoints re-installs the same adapter names around itself
  whenever it runs: in the forward and again in the recompute, however late that comes.
* the per-layer stacks built for autograd take their small per-slot tables (scalings, ranks)
  from a cache instead of ``torch.tensor(list, device=...)`` per layer (a blocking copy).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import torch
from torch import Tensor, nn

from lora_kernels.integrations.peft_mixed import stack_factors

_HOOKS_ATTR = "_enable_peft_forward_hooks"


def find_tuners(model: nn.Module) -> list[nn.Module]:
    """The PEFT tuner modules (``LoraModel``s) inside ``model`` whose class has PEFT's hook
    context manager; a bare module tree of LoRA layers has none (then nothing is installed)."""
    from peft.tuners.tuners_utils import BaseTuner
    return [m for m in model.modules() if isinstance(m, BaseTuner) and
            hasattr(type(m), _HOOKS_ATTR)]


class JointState:
    """What a patch handle keeps for joint training: the tuners it opened and small cached
    per-slot tables."""

    def __init__(self):
        self.tuners: list[nn.Module] = []
        self.tables: dict = {}

    def install(self, model: nn.Module) -> None:
        for tuner in find_tuners(model):
            hook = tuner.__dict__.get(_HOOKS_ATTR)
            if hook is not None:
                # ours (a copy of a patched model, re-adopted by PeftPatchHandle.of): track it;
                # someone else's wrapper on the instance: leave theirs alone
                if _is_ours(hook) and all(t is not tuner for t in self.tuners):
                    self.tuners.append(tuner)
                continue
            # a partial of a module-level function, not a bound method: it pickles and
            # deep-copies with the model (a bound method pickles as getattr(tuner, name))
            tuner.__dict__[_HOOKS_ATTR] = functools.partial(joint_forward_hooks, tuner)
            self.tuners.append(tuner)

    def __getstate__(self):
        # A copy finds its own tuners again (PeftPatchHandle.of -> install): keeping them here
        # would drag the whole model into a copy of one layer; the tables are caches.
        return {"tuners": [], "tables": {}}

    def uninstall(self) -> None:
        for tuner in self.tuners:
            tuner.__dict__.pop(_HOOKS_ATTR, None)
        self.tuners.clear()
        self.tables.clear()


def _is_ours(hook) -> bool:
    return isinstance(hook, functools.partial) and hook.func is joint_forward_hooks


@contextlib.contextmanager
def joint_forward_hooks(tuner: nn.Module, *args, **kwargs):
    """PEFT's ``_enable_peft_forward_hooks`` (the class's own), with mixed batches allowed in
    training mode. Installed on the instance only while a patch is active."""
    peft_hooks = type(tuner)._enable_peft_forward_hooks
    names = kwargs.get("adapter_names")
    if names is None or not tuner.training:
        with peft_hooks(tuner, *args, **kwargs):
            yield
        return
    with contextlib.ExitStack() as stack:
        # PEFT's training-mode check reads the tuner's own flag; no module below it (where
        # dropout lives) reads that attribute, so flipping it for the check alone changes
        # nothing else.
        tuner.training = False
        try:
            stack.enter_context(peft_hooks(tuner, *args, **kwargs))
        finally:
            tuner.training = True
        stack.enter_context(_checkpoint_replay(tuner, list(names)))
        yield


def _names_hook(names):
    def hook(module, args, kwargs):
        kwargs["adapter_names"] = names
        return args, kwargs
    return hook


@contextlib.contextmanager
def _names_installed(layers: Sequence[nn.Module], names):
    handles = [m.register_forward_pre_hook(_names_hook(names), with_kwargs=True) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _checkpoint_replay(tuner: nn.Module, names):
    """Wrap every active ``_gradient_checkpointing_func`` under ``tuner`` for this forward."""
    from peft.tuners.lora import LoraLayer
    wrapped = []
    for module in tuner.modules():
        ckpt = module.__dict__.get("_gradient_checkpointing_func")
        if ckpt is None or not getattr(module, "gradient_checkpointing", False):
            continue
        layers = [m for m in module.modules() if isinstance(m, LoraLayer)]
        if not layers:
            continue

        def replaying(fn, *args, _ckpt=ckpt, _layers=layers, **kwargs):
            def run(*a, **k):  # what the checkpoint calls now and again in the backward
                with _names_installed(_layers, names):
                    return fn(*a, **k)
            return _ckpt(run, *args, **kwargs)
        module.__dict__["_gradient_checkpointing_func"] = replaying
        wrapped.append((module, ckpt))
    try:
        yield
    finally:
        for module, ckpt in wrapped:
            module.__dict__["_gradient_checkpointing_func"] = ckpt


# ------------------------------------------------------------------------------------------
# The stack a training step builds, per layer
# ------------------------------------------------------------------------------------------
def _tables(state: JointState, layer, slot_names, device) -> tuple[Tensor, Tensor]:
    """``(scalings [S] f32, ranks [S] i32)`` on ``device``, cached by their values."""
    scal = tuple(float(layer.scaling[n]) if n in layer.lora_A else 0.0 for n in slot_names)
    ranks = tuple(layer.lora_A[n].weight.shape[0] if n in layer.lora_A else 0
                  for n in slot_names)
    key = (scal, ranks, str(device))
    if torch.compiler.is_compiling():  # constants in the graph; no dict to guard on
        return (torch.tensor(scal, dtype=torch.float32, device=device),
                torch.tensor(ranks, dtype=torch.int32, device=device))
    hit = state.tables.get(key)
    if hit is None:
        hit = (torch.tensor(scal, dtype=torch.float32).to(device),
               torch.tensor(ranks, dtype=torch.int32).to(device))
        if len(state.tables) > 256:
            state.tables.clear()
        state.tables[key] = hit
    return hit


def train_stack(state: JointState, layer, slot_names: Sequence[str], dtype: torch.dtype,
                device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(lora_a [S, R, K], lora_b [S, N, R], scalings, ranks)`` like ``peft_mixed.build_stack``
    (the same :func:`stack_factors`, differentiable in PEFT's own factors), with cached tables."""
    lora_a, lora_b = stack_factors(layer, slot_names, dtype, device)
    scalings, ranks = _tables(state, layer, slot_names, device)
    return lora_a, lora_b, scalings, ranks
