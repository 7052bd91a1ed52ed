"""Tuned launch configurations as data: ``lora_kernels/ops/tuned_configs.json``, keyed by
kernel, shape class, device name and Triton version (major.minor), written by the GPU
campaign; the in-code lists of :mod:`configs` are the fallback for anything not in it.

Format::

    {"format": 1,
     "entries": [{"kernel": "gemm", "shape_class": "large", "device": "NVIDIA H100 80GB HBM3",
                  "triton": "3.6",
                  "configs": [{"kwargs": {"BLOCK_M": 128, ...}, "num_warps": 8,
                               "num_stages": 3}]}]}

``LORA_KERNELS_TUNED_CONFIGS`` points at another file (an empty value disables the file). A
missing or malformed file never fails a launch: it warns once and the fallback is used.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path

import torch
import triton

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "ops" / "tuned_configs.json"


def triton_version() -> str:
    return ".".join(triton.__version__.split(".")[:2])


def device_name(device) -> str:
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device)


def _path() -> str:
    return os.environ.get("LORA_KERNELS_TUNED_CONFIGS", str(DEFAULT_PATH))


@functools.lru_cache(maxsize=8)
def _entries(path: str) -> tuple:
    if not path or not Path(path).exists():
        return ()
    try:
        data = json.loads(Path(path).read_text())
        entries = data.get("entries", []) if data else []
        return tuple(entries)
    except (OSError, ValueError, AttributeError) as exc:
        warnings.warn(f"lora_kernels: ignoring tuned configs {path}: {exc!r}", RuntimeWarning)
        return ()


def _config(d: dict) -> triton.Config:
    return triton.Config(dict(d["kwargs"]), num_warps=int(d.get("num_warps", 4)),
                         num_stages=int(d.get("num_stages", 3)))


def lookup(kernel: str, shape_class: str, device, fallback: list) -> list:
    """The tuned configs for this key, completed with the fallback's defaults for keys a
    tuned entry omits (e.g. ``WARP_SPEC``); ``fallback`` when there is no entry."""
    name, version = device_name(device), triton_version()
    for e in _entries(_path()):
        if (e.get("kernel"), e.get("shape_class"), e.get("device"), e.get("triton")) == \
                (kernel, shape_class, name, version):
            try:
                defaults = dict(fallback[0].kwargs) if fallback else {}
                found = [_config({**d, "kwargs": {**defaults, **d["kwargs"]}})
                         for d in e.get("configs", [])]
            except (KeyError, TypeError, ValueError) as exc:
                warnings.warn(f"lora_kernels: bad tuned entry {kernel}/{shape_class}: {exc!r}",
                              RuntimeWarning)
                return fallback
            return found or fallback
    return fallback
