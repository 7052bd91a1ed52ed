"""Version discipline for the serving-engine integrations (SGLang, vLLM).

An engine's internal LoRA interfaces change between releases without notice, so each
integration names the releases it was tested against and refuses others with a message that
says what was found, what is supported and how to try anyway. Reading the version needs only
package metadata: nothing of the engine is imported here.
"""

from __future__ import annotations

import os
from importlib import metadata
from typing import Optional, Sequence


class UnsupportedEngineVersion(RuntimeError):
    """The installed engine is not a release this integration was tested against."""


def installed_version(dist: str) -> Optional[str]:
    """The installed distribution's version string, or None when it is not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _base(version: str) -> str:
    # "0.5.23+cu130" and "0.5.23.post1" are builds of 0.5.23; "0.5.23rc1" is not a release.
    return version.split("+", 1)[0].split(".post", 1)[0]


def is_supported(version: Optional[str], supported: Sequence[str]) -> bool:
    return version is not None and _base(version) in supported


def check_engine_version(dist: str, supported: Sequence[str], allow_env: str) -> str:
    """Return the installed version of ``dist`` if it is one of ``supported`` (or the user set
    ``allow_env=1`` to run an untested one); raise otherwise."""
    found = installed_version(dist)
    if found is None:
        raise UnsupportedEngineVersion(
            f"lora_kernels' {dist} integration needs {dist} installed "
            f"(tested: {', '.join(supported)}); `pip install {dist}=={supported[-1]}`")
    if is_supported(found, supported) or os.environ.get(allow_env) == "1":
        return found
    raise UnsupportedEngineVersion(
        f"lora_kernels' {dist} integration supports {dist} {', '.join(supported)}, found {found}. "
        f"Its LoRA backend interface changes between releases; install a supported version, "
        f"or set {allow_env}=1 to try this one untested.")
