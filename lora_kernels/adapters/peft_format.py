"""PEFT adapter files: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``).

We read and write PEFT's format without importing PEFT. Keys look like
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (no adapter name in files;
``lora_A.<adapter>.weight`` from a live PEFT state dict is accepted too). Everything that can be
wrong is collected and reported at once, naming the key or module and what was expected, and
nothing is returned half-parsed.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lora_kernels.nn.inject import matches_targets
from lora_kernels.nn.lora_linear import PackedLoRALinear, LoRABase, is_conv1d, lora_scaling
from lora_kernels.nn.multi_lora import MultiLoRALinear

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

PathLike = Union[str, os.PathLike]


class AdapterFormatError(ValueError):
    """An adapter file is missing, unreadable, truncated, or not plain LoRA in PEFT's format."""


class AdapterMismatchError(ValueError):
    """An adapter does not fit a model; ``problems`` lists every mismatch."""

    def __init__(self, problems: Sequence[str], what: str = "adapter"):
        self.problems = list(problems)
        lines = "\n  - ".join(self.problems)
        super().__init__(f"{what} does not fit the model ({len(self.problems)} problem(s)):"
                         f"\n  - {lines}")


# ------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------
def _pattern_key(patterns: Mapping[str, Any], module: str) -> Optional[str]:
    """PEFT's ``get_pattern_key``: a pattern applies to a module path that ends with it (regex)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def targets_match(target_modules, module: str) -> bool:
    """PEFT's rule (:func:`~lora_kernels.nn.inject.matches_targets`); None targets everything."""
    return target_modules is None or matches_targets(module, target_modules)


@dataclass
class AdapterConfig:
    """The fields of a PEFT ``LoraConfig`` that decide the math; the rest travels in ``extra``."""

    r: int = 8
    lora_alpha: float = 8.0
    target_modules: Optional[Union[str, list]] = None
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    lora_dropout: float = 0.0
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    bias: str = "none"
    base_model_name_or_path: Optional[str] = None
    extra: dict = field(default_factory=dict)

    _FIELDS = ("r", "lora_alpha", "target_modules", "use_rslora", "fan_in_fan_out", "lora_dropout",
               "rank_pattern", "alpha_pattern", "use_dora", "lora_bias", "bias",
               "base_model_name_or_path")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> "AdapterConfig":
        if not isinstance(d, Mapping):
            raise AdapterFormatError(f"{source}: expected a JSON object, got {type(d).__name__}")
        peft_type = d.get("peft_type", "LORA")
        if peft_type not in ("LORA", None):
            raise AdapterFormatError(f"{source}: peft_type is {peft_type!r}; only LoRA adapters "
                                     f"(peft_type 'LORA') are supported")
        kw = {k: d[k] for k in cls._FIELDS if k in d and d[k] is not None}
        cfg = cls(**kw, extra={k: v for k, v in d.items() if k not in cls._FIELDS})
        problems = cfg.problems()
        if problems:
            raise AdapterFormatError(f"{source}: " + "; ".join(problems))
        return cfg

    def problems(self) -> list[str]:
        out = []
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            out.append(f"r must be a positive int, got {self.r!r}")
        for name, val in [("lora_alpha", self.lora_alpha), *(
                (f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items())]:
            if isinstance(val, bool) or not isinstance(val, (int, float)) or \
                    not math.isfinite(val) or val <= 0:
                out.append(f"{name} must be a positive number, got {val!r}")
        for k, v in self.rank_pattern.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                out.append(f"rank_pattern[{k!r}] must be a positive int, got {v!r}")
        if not (self.target_modules is None or isinstance(self.target_modules, str) or
                (isinstance(self.target_modules, (list, tuple)) and
                 all(isinstance(t, str) for t in self.target_modules))):
            out.append(f"target_modules must be a regex string or a list of names, "
                       f"got {self.target_modules!r}")
        if self.lora_bias:
            out.append("lora_bias=True: adapters with a LoRA bias are not supported")
        if self.bias not in ("none", None):
            out.append(f"bias={self.bias!r}: adapters that train base biases are not supported "
                       f"(bias must be 'none')")
        return out

    def rank_for(self, module: str) -> int:
        key = _pattern_key(self.rank_pattern, module)
        return int(self.rank_pattern[key]) if key is not None else int(self.r)

    def alpha_for(self, module: str) -> float:
        key = _pattern_key(self.alpha_pattern, module)
        return float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)

    def scaling_for(self, module: str, r: Optional[int] = None) -> float:
        """PEFT's scaling: ``alpha / r`` or, with rsLoRA, ``alpha / sqrt(r)``."""
        r = self.rank_for(module) if r is None else r
        return lora_scaling(r, self.alpha_for(module), self.use_rslora)

    def to_dict(self) -> dict:
        """PEFT's ``adapter_config.json`` content (``LoraConfig.from_pretrained`` reads it)."""
        d = {"peft_type": "LORA", "task_type": None, "inference_mode": True,
             "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
             "layers_pattern": None}
        d.update(self.extra)
        d.update({k: getattr(self, k) for k in self._FIELDS})
        if isinstance(d["target_modules"], tuple):
            d["target_modules"] = list(d["target_modules"])
        return d


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------
_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_UNSUPPORTED = (("lora_magnitude_vector", "DoRA magnitude vectors (use_dora)"),
                ("lora_embedding_", "LoRA on embeddings"),
                (".lora_B.bias", "a LoRA bias (lora_bias)"),
                ("modules_to_save", "fully trained extra modules (modules_to_save)"))


def module_path(key: str) -> Optional[tuple[str, str]]:
    """``(module path, "lora_A"|"lora_B")`` of a PEFT key, or None if it is not a LoRA factor.
    The ``base_model.model.`` prefix and an adapter name inside the key are dropped."""
    m = _KEY.match(key)
    if m is None:
        return None
    module = m.group("module")
    if module.startswith(PREFIX):
        module = module[len(PREFIX):]
    return module, m.group("kind")


_MAGNITUDE = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.(?P<adapter>[^.]+)\.weight)?$")


def split_modules(state_dict: Mapping[str, Tensor], source: str = "adapter",
                  magnitudes: Optional[dict] = None) -> dict[str, tuple[Tensor, Tensor]]:
    """``{module path: (lora_A [r, in], lora_B [out, r])}`` from PEFT keys, checking that every key
    is a LoRA factor, every module has both, and the ranks agree. Raises ``AdapterFormatError``
    listing every problem. DoRA's ``<module>.lora_magnitude_vector`` keys are refused, unless
    ``magnitudes`` (a dict) is given: then they are collected into it, ``{module: m [out]}``."""
    problems, parts = [], {}
    for key, t in state_dict.items():
        mag = _MAGNITUDE.match(key) if magnitudes is not None else None
        if mag is not None:
            module = mag.group("module")
            module = module[len(PREFIX):] if module.startswith(PREFIX) else module
            if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 1:
                problems.append(f"key {key!r} must be a 1-D float tensor (DoRA magnitude)")
            elif module in magnitudes:
                problems.append(f"module {module!r} has two lora_magnitude_vector tensors")
            else:
                magnitudes[module] = t
            continue
        why = next((w for pat, w in _UNSUPPORTED if pat in key), None)
        parsed = module_path(key)
        if why is not None:
            problems.append(f"key {key!r} holds {why}, which is not supported")
            continue
        if parsed is None:
            problems.append(f"key {key!r} is not a LoRA factor (expected "
                            f"'{PREFIX}<module>.lora_A.weight' / '.lora_B.weight')")
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 2:
            got = f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}"
            problems.append(f"key {key!r} must be a 2-D float tensor, got {got}")
            continue
        module, kind = parsed
        slot = parts.setdefault(module, {})
        if kind in slot:
            problems.append(f"module {module!r} has two {kind} tensors (several adapters in one "
                            f"file? save one adapter per directory)")
        slot[kind] = t
    out = {}
    for module, slot in sorted(parts.items()):
        if set(slot) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(slot)).pop()
            problems.append(f"module {module!r} has no {missing} tensor")
            continue
        a, b = slot["lora_A"], slot["lora_B"]
        if a.shape[0] != b.shape[1]:
            problems.append(f"module {module!r}: lora_A {list(a.shape)} has rank {a.shape[0]} but "
                            f"lora_B {list(b.shape)} has rank {b.shape[1]}")
            continue
        out[module] = (a, b)
    for module, m in sorted((magnitudes or {}).items()):
        if module not in out:
            problems.append(f"module {module!r} has a lora_magnitude_vector but no LoRA factors")
        elif m.shape[0] != out[module][1].shape[0]:
            problems.append(f"module {module!r}: lora_magnitude_vector {list(m.shape)} must be "
                            f"[out] = [{out[module][1].shape[0]}]")
    if not problems and not out:
        problems.append("no LoRA tensors found")
    if problems:
        raise AdapterFormatError(f"{source}: " + "; ".join(problems))
    return out


def _resolve_dir(path: PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike (an adapter directory), got "
                        f"{type(path).__name__}")
    p = Path(path)
    if p.is_file() and p.name in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME):
        p = p.parent
    if not p.exists():
        raise AdapterFormatError(f"adapter path {str(p)!r} does not exist")
    if not p.is_dir():
        raise AdapterFormatError(f"adapter path {str(p)!r} must be a directory holding "
                                 f"{CONFIG_NAME} and {SAFETENSORS_NAME} (or {BIN_NAME})")
    return p


def _read_weights(d: Path) -> dict[str, Tensor]:
    st, bn = d / SAFETENSORS_NAME, d / BIN_NAME
    if st.is_file():
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise AdapterFormatError(f"{st} needs the safetensors package: "
                                     f"pip install safetensors") from exc
        try:
            return load_file(str(st), device="cpu")
        except Exception as exc:  # SafetensorError, OSError: truncated or corrupt files
            raise AdapterFormatError(f"{st} is truncated or corrupt "
                                     f"({type(exc).__name__}: {exc})") from exc
    if bn.is_file():
        try:
            sd = torch.load(str(bn), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterFormatError(f"{bn} is truncated or corrupt "
                                     f"({type(exc).__name__}: {exc})") from exc
        if not isinstance(sd, Mapping):
            raise AdapterFormatError(f"{bn} must hold a dict of tensors, got {type(sd).__name__}")
        return dict(sd)
    files = sorted(f.name for f in d.iterdir())
    raise AdapterFormatError(f"{d} has no {SAFETENSORS_NAME} or {BIN_NAME} (found: {files})")


def read_config(path: PathLike) -> AdapterConfig:
    d = _resolve_dir(path)
    cfg_path = d / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterFormatError(f"{d} has no {CONFIG_NAME}: not a PEFT adapter directory")
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterFormatError(f"{cfg_path} is not valid JSON: {exc}") from exc
    return AdapterConfig.from_dict(raw, source=str(cfg_path))


def load_peft_adapter(path: PathLike, model: Optional[nn.Module] = None
                      ) -> tuple[AdapterConfig, dict[str, Tensor]]:
    """Read a PEFT LoRA adapter directory: ``(config, state_dict)`` with the file's keys.

    Checks the files (config present and valid, weights readable - a truncated safetensors file
    is an error, plain LoRA or DoRA) and the tensors against the config (ranks incl.
    ``rank_pattern``, modules in ``target_modules``). With ``model``, also checks every module
    exists in it with matching shapes (:func:`check_adapter`). Raises ``AdapterFormatError`` /
    ``AdapterMismatchError`` saying exactly what does not fit.
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (or None), got {type(model).__name__}")
    d = _resolve_dir(path)
    cfg = read_config(d)
    sd = _read_weights(d)
    magnitudes: dict = {}
    modules = split_modules(sd, source=str(d), magnitudes=magnitudes)
    _check_dora(cfg, modules, magnitudes, str(d))
    problems = config_problems(cfg, modules)
    if problems:
        raise AdapterMismatchError(problems, what=f"adapter {str(d)!r}: its tensors and "
                                               f"{CONFIG_NAME}")
    if model is not None:
        check_adapter(cfg, modules, model, what=f"adapter {str(d)!r}")
    return cfg, sd


def _check_dora(cfg: AdapterConfig, modules, magnitudes: Mapping[str, Tensor], what: str) -> None:
    """DoRA (``use_dora=True``) files hold one ``lora_magnitude_vector`` per module; others none."""
    if cfg.use_dora and set(magnitudes) != set(modules):
        missing = sorted(set(modules) - set(magnitudes))
        raise AdapterFormatError(f"{what}: use_dora=True (DoRA) but modules {missing} have no "
                                 f"lora_magnitude_vector")
    if not cfg.use_dora and magnitudes:
        raise AdapterFormatError(f"{what}: DoRA lora_magnitude_vector tensors for "
                                 f"{sorted(magnitudes)} but the config says use_dora=False")


def config_problems(cfg: AdapterConfig, modules: Mapping[str, tuple[Tensor, Tensor]]) -> list[str]:
    out = []
    for module, (a, _) in modules.items():
        want = cfg.rank_for(module)
        if a.shape[0] != want:
            via = " (rank_pattern)" if _pattern_key(cfg.rank_pattern, module) else ""
            out.append(f"module {module!r}: tensors have rank {a.shape[0]} but the config says "
                       f"r={want}{via}")
        if not targets_match(cfg.target_modules, module):
            out.append(f"module {module!r} has weights but is not in target_modules="
                       f"{cfg.target_modules!r}")
    return out


# ------------------------------------------------------------------------------------------
# Checking against a model
# ------------------------------------------------------------------------------------------
def linear_features(module: nn.Module) -> Optional[tuple[int, int]]:
    """``(in, out)`` of a linear-like module (nn.Linear, Conv1D, our LoRA layers, PEFT's)."""
    if isinstance(module, (LoRABase, MultiLoRALinear)) or hasattr(module, "base_layer"):
        if isinstance(getattr(module, "in_features", None), int):
            return module.in_features, module.out_features
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


def find_module(model: nn.Module, path: str) -> Optional[nn.Module]:
    """The module at ``path``, also under a PeftModel's ``base_model.model.`` prefix."""
    for p in (path, PREFIX + path):
        try:
            return model.get_submodule(p)
        except AttributeError:
            continue
    return None


def check_adapter(cfg: AdapterConfig, modules: Mapping[str, tuple[Tensor, Tensor]],
                  model: nn.Module, what: str = "adapter") -> None:
    """Every module the adapter touches exists in ``model``, is linear-like, and the factors'
    shapes are ``[r, in]`` / ``[out, r]``. Raises ``AdapterMismatchError`` with all problems."""
    problems = config_problems(cfg, modules)
    for module, (a, b) in modules.items():
        m = find_module(model, module)
        if m is None:
            problems.append(f"unknown target module {module!r}: the model has no module of "
                            f"that name")
            continue
        feats = linear_features(m)
        if feats is None:
            problems.append(f"module {module!r} is a {type(m).__name__}, not a linear layer")
            continue
        k, n = feats
        if a.shape[1] != k or b.shape[0] != n:
            problems.append(f"module {module!r} is [in={k}, out={n}] but the adapter has lora_A "
                            f"{list(a.shape)} (expected [r, {k}]) and lora_B {list(b.shape)} "
                            f"(expected [{n}, r])")
    if problems:
        raise AdapterMismatchError(problems, what=what)


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------
def _from_model(model: nn.Module) -> tuple[dict, dict]:
    """``({module: (A, B)}, {module: (r, alpha)})`` from our LoRA layers. A packed layer becomes
    one PEFT LoRA of rank ``n_adapted·r`` (block-diagonal B) with alpha scaled so that PEFT's
    ``alpha/r`` equals ours - exactly the same function."""
    modules, ra, mags = {}, {}, {}
    rslora = set()
    for name, m in model.named_modules():
        if not isinstance(m, LoRABase):
            continue
        a = m.lora_A.weight.detach()
        b = m._lora_b_full().detach()
        r = a.shape[0]
        factor = r / m.r
        alpha = m.lora_alpha * (math.sqrt(factor) if m.use_rslora else factor) \
            if isinstance(m, PackedLoRALinear) else m.lora_alpha
        modules[name] = (a, b)
        if m.use_dora:
            mags[name] = m.dora_magnitude().detach()  # [out]; packed: c = 1 off its slices
        ra[name] = (r, alpha, m.fan_in_fan_out)
        rslora.add(m.use_rslora)
    if not modules:
        raise ValueError("the model has no LoRALinear/PackedLoRALinear layers to save")
    if len(rslora) > 1:
        raise ValueError("layers mix use_rslora=True and False; PEFT stores one use_rslora per "
                         "adapter")
    if mags and len(mags) != len(modules):
        raise ValueError("layers mix use_dora=True and False; PEFT stores one use_dora per adapter")
    return modules, {"ranks_alphas": ra, "use_rslora": rslora.pop(), "magnitudes": mags}


def _most_common(values):
    return max(set(values), key=lambda v: (values.count(v), -values.index(v)))


def save_peft_adapter(path: PathLike, source: Union[nn.Module, Mapping[str, Tensor]],
                      config: Optional[Union[AdapterConfig, Mapping[str, Any]]] = None, *,
                      base_model_name_or_path: Optional[str] = None,
                      safe_serialization: bool = True) -> Path:
    """Write ``source`` as a PEFT adapter directory that ``PeftModel.from_pretrained`` loads.

    ``source``: a model with our ``LoRALinear``/``PackedLoRALinear`` layers (config derived:
    ``r``/``lora_alpha`` from the most common layer, ``rank_pattern``/``alpha_pattern`` for the
    others, ``target_modules`` = the adapted module paths), or a state dict with PEFT keys plus
    ``config``. Files are written to a temporary name and renamed, so a crash never leaves a
    half-written adapter. Returns the directory.
    """
    if isinstance(source, nn.Module):
        modules, info = _from_model(source)
        magnitudes = info["magnitudes"]
        ra = info["ranks_alphas"]
        names = sorted(modules)
        ranks = [ra[n][0] for n in names]
        alphas = [ra[n][1] for n in names]
        r0, a0 = _most_common(ranks), _most_common(alphas)
        base = AdapterConfig() if config is None else (
            config if isinstance(config, AdapterConfig) else AdapterConfig.from_dict(config))
        cfg = AdapterConfig(
            r=r0, lora_alpha=a0, target_modules=names, use_rslora=info["use_rslora"],
            fan_in_fan_out=any(ra[n][2] for n in names), lora_dropout=base.lora_dropout,
            use_dora=bool(info["magnitudes"]),
            rank_pattern={re.escape(n): r for n, r in zip(names, ranks) if r != r0},
            alpha_pattern={re.escape(n): a for n, a in zip(names, alphas) if a != a0},
            base_model_name_or_path=base_model_name_or_path or base.base_model_name_or_path,
            extra=dict(base.extra))
    else:
        if config is None:
            raise ValueError("saving a state dict needs config= (an AdapterConfig or a dict "
                             "with at least r and lora_alpha)")
        cfg = config if isinstance(config, AdapterConfig) else AdapterConfig.from_dict(config)
        if base_model_name_or_path is not None:
            cfg.base_model_name_or_path = base_model_name_or_path
        magnitudes = {}
        modules = split_modules(source, source="state_dict", magnitudes=magnitudes)
        _check_dora(cfg, modules, magnitudes, "state_dict")
    problems = cfg.problems() + config_problems(cfg, modules)
    if problems:
        raise AdapterMismatchError(problems, what="adapter to save")
    tensors = {}
    for module, (a, b) in modules.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.detach().to("cpu").contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b.detach().to("cpu").contiguous()
        if module in magnitudes:  # DoRA: PEFT's file key has no adapter name and no .weight
            tensors[f"{PREFIX}{module}.lora_magnitude_vector"] = \
                magnitudes[module].detach().to("cpu").contiguous()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / CONFIG_NAME, lambda f: f.write(json.dumps(cfg.to_dict(), indent=2,
                                                                  sort_keys=True).encode()))
    if safe_serialization:
        from safetensors.torch import save
        blob = save(tensors, metadata={"format": "pt"})
        _atomic_write(out / SAFETENSORS_NAME, lambda f: f.write(blob))
    else:
        _atomic_write(out / BIN_NAME, lambda f: torch.save(tensors, f))
    return out


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
