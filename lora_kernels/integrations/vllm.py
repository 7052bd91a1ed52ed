"""vLLM integration: our kernels behind vLLM's punica interface, opt-in.

    pip install lora-kernels        # registers the plugin (entry point ``vllm.general_plugins``)
    LORA_KERNELS_VLLM=1 vllm serve <model> --enable-lora --lora-modules a=...

vLLM calls every ``vllm.general_plugins`` entry point in each of its processes. Without
``LORA_KERNELS_VLLM=1`` :func:`register` does nothing, so installing lora-kernels never changes
a vLLM install silently. With it, :func:`register` checks the vLLM version
(:data:`SUPPORTED_VLLM_VERSIONS`; an untested one raises at start-up, which vLLM does not
swallow, unless ``LORA_KERNELS_VLLM_ALLOW_UNTESTED=1``) and makes the current platform's
``get_punica_wrapper()`` name
:class:`~lora_kernels.integrations.vllm_punica.LoRAKernelsPunicaWrapper`, which vLLM's
``punica_selector`` then instantiates for every LoRA model.
"""

from __future__ import annotations

import logging
import os

from lora_kernels.integrations.engine_versions import (UnsupportedEngineVersion,
                                                       check_engine_version)

__all__ = ["ENABLE_ENV", "SUPPORTED_VLLM_VERSIONS", "UnsupportedEngineVersion",
           "WRAPPER_QUALNAME", "check_vllm_version", "register"]

ENABLE_ENV = "LORA_KERNELS_VLLM"
ALLOW_UNTESTED_ENV = "LORA_KERNELS_VLLM_ALLOW_UNTESTED"
# Releases whose punica interface (punica_base.py, punica_selector.py, the platforms'
# get_punica_wrapper) this wrapper was tested against, beside vLLM's own CPU wrapper.
SUPPORTED_VLLM_VERSIONS = ("0.33.0",)
WRAPPER_QUALNAME = "lora_kernels.integrations.vllm_punica.LoRAKernelsPunicaWrapper"

logger = logging.getLogger(__name__)


def check_vllm_version() -> str:
    """The installed vLLM version, or :class:`UnsupportedEngineVersion` saying why not."""
    return check_engine_version("vllm", SUPPORTED_VLLM_VERSIONS, ALLOW_UNTESTED_ENV)


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "0").strip() == "1"


def _wrapper_qualname() -> str:
    return WRAPPER_QUALNAME


def register() -> None:
    """The ``vllm.general_plugins`` entry point. Idempotent; a no-op unless enabled."""
    if not enabled():
        return
    check_vllm_version()
    from vllm import platforms

    platform = platforms.current_platform
    if getattr(platform, "get_punica_wrapper", None) is not _wrapper_qualname:
        # An instance attribute shadows the platform class's classmethod for this process.
        platform.get_punica_wrapper = _wrapper_qualname
    logger.info("lora_kernels: vLLM LoRA runs on %s", WRAPPER_QUALNAME)


def __getattr__(name):
    if name == "LoRAKernelsPunicaWrapper":
        check_vllm_version()
        from lora_kernels.integrations.vllm_punica import LoRAKernelsPunicaWrapper
        return LoRAKernelsPunicaWrapper
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
