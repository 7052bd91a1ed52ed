"""SGLang integration: our kernels as SGLang's LoRA backend ``lora_kernels``.

    pip install lora-kernels        # registers the plugin (entry point ``sglang.srt.plugins``)
    python -m sglang.launch_server --model-path ... --enable-lora --lora-paths a=... \\
        --lora-backend lora_kernels

SGLang loads every ``sglang.srt.plugins`` entry point early in each of its processes (server,
scheduler, workers) and calls it; :func:`register` then

1. checks the installed SGLang against :data:`SUPPORTED_SGLANG_VERSIONS`;
2. adds ``lora_kernels`` to SGLang's backend registry (``lora_registry``) — lazily, so the
   backend module (and our ops) load only when the backend is chosen;
3. adds ``lora_kernels`` to the ``--lora-backend`` choices (a fixed list in SGLang's argument
   declaration: the list object is extended in place, before the parser is built).

On an untested SGLang the name is still registered, but choosing it raises
:class:`UnsupportedEngineVersion` with the versions it supports, instead of SGLang's bare
"invalid choice" (``LORA_KERNELS_SGLANG_ALLOW_UNTESTED=1`` runs it anyway).

The backend class itself lives in :mod:`lora_kernels.integrations.sglang_backend` (it imports
SGLang); ``LoRAKernelsSGLangBackend`` is re-exported here on first access.
"""

from __future__ import annotations

import logging
from typing import get_args, get_type_hints

from lora_kernels.integrations.engine_versions import (UnsupportedEngineVersion,
                                                       check_engine_version)

__all__ = ["BACKEND_NAME", "SUPPORTED_SGLANG_VERSIONS", "UnsupportedEngineVersion",
           "check_sglang_version", "register"]

BACKEND_NAME = "lora_kernels"
# Releases whose LoRA backend interface (base_backend.py, layers.py, lora_registry.py and the
# --lora-backend field) this backend was tested against, in CI, beside SGLang's torch_native.
SUPPORTED_SGLANG_VERSIONS = ("0.5.23",)
ALLOW_UNTESTED_ENV = "LORA_KERNELS_SGLANG_ALLOW_UNTESTED"

logger = logging.getLogger(__name__)


def check_sglang_version() -> str:
    """The installed SGLang version, or :class:`UnsupportedEngineVersion` saying why not."""
    return check_engine_version("sglang", SUPPORTED_SGLANG_VERSIONS, ALLOW_UNTESTED_ENV)


def _backend_factory():
    # Called by SGLang's get_backend_from_name() when --lora-backend lora_kernels is chosen.
    check_sglang_version()
    from lora_kernels.integrations.sglang_backend import LoRAKernelsSGLangBackend
    return LoRAKernelsSGLangBackend


def _extend_cli_choices() -> bool:
    """Add our name to ``--lora-backend``'s choices. True if the choices now include it.

    ServerArgs holds the evaluated ``Annotated[str, Arg(choices=[...])]`` of every field and
    its argparse parser is built from those objects when the command line is parsed, which
    SGLang does after loading plugins; the ``Lora`` namespace class keeps its annotation as a
    string (postponed evaluation), so it gets the evaluated object written back."""
    from sglang.srt.arg_groups.fields import lora as lora_fields
    from sglang.srt.server_args import ServerArgs

    ok = False
    for cls in (ServerArgs, lora_fields.Lora):
        hint = get_type_hints(cls, include_extras=True).get("lora_backend")
        args = get_args(hint)
        meta = [a for a in args[1:] if isinstance(getattr(a, "choices", None), list)]
        if not meta:
            continue
        if BACKEND_NAME not in meta[0].choices:
            meta[0].choices.append(BACKEND_NAME)
        if "lora_backend" in getattr(cls, "__annotations__", {}):
            cls.__annotations__["lora_backend"] = hint
        ok = True
    return ok


def register() -> None:
    """The ``sglang.srt.plugins`` entry point: make ``--lora-backend lora_kernels`` work.

    Idempotent. Raises :class:`UnsupportedEngineVersion` only when SGLang's registry cannot
    be found at all (SGLang logs a plugin's exception and goes on)."""
    try:
        check_sglang_version()
    except UnsupportedEngineVersion as exc:
        # Still register: choosing the backend then fails with this message (see module doc).
        logger.warning("%s", exc)
    try:
        from sglang.srt.lora.backend import lora_registry
    except ImportError as exc:
        raise UnsupportedEngineVersion(
            f"this SGLang has no sglang.srt.lora.backend.lora_registry ({exc}); lora_kernels "
            f"supports sglang {', '.join(SUPPORTED_SGLANG_VERSIONS)}") from exc
    if BACKEND_NAME not in lora_registry.LORA_SUPPORTED_BACKENDS:
        lora_registry.register_lora_backend(BACKEND_NAME)(_backend_factory)
    if not _extend_cli_choices():
        logger.warning("lora_kernels: could not find SGLang's --lora-backend choices; the "
                       "backend is registered for the Python API (Engine(lora_backend=...)) only")


def __getattr__(name):
    if name == "LoRAKernelsSGLangBackend":
        return _backend_factory()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
