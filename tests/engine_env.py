"""Put the serving engines' pure-Python LoRA modules where the engine tests find them, without
the engines' dependency pins (they would replace this project's torch).

    python tests/engine_env.py sglang     # pip install --no-deps sglang==V + light imports
    python tests/engine_env.py vllm       # vLLM's wheel, only the modules its punica
                                          # wrapper imports, unpacked to <venv>/engine-src/
    python tests/engine_env.py wheels .whl   # SGLang + light deps as wheels, for a device
                                          # machine without registries (bench/gpu.sh
                                          # installs .whl/*.whl); torchvision excluded: it
                                          # must match the device's own torch

SGLang's LoRA backend modules import ~20 small packages (found by importing them), all
installed ``--no-deps``. vLLM's wheel is 336 MB, mostly compiled kernels; its punica base
class, CPU wrapper and torch reference ops need only a few pure-Python subpackages, which are
unpacked (with the dist-info, so the version is readable) and the wheel deleted.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SGLANG_VERSION = "0.5.23"
VLLM_VERSION = "0.33.0"
# What `import sglang.srt.lora.backend.torch_backend` (and the registry, server args) needs.
# Versions pinned where SGLang 0.5.23 pins them; torchvision must match torch 2.14.1.
SGLANG_LIGHT_DEPS = [
    "orjson", "pybase64", "requests", "urllib3", "certifi", "idna", "charset-normalizer",
    "starlette", "anyio",
    "msgspec", "pyzmq", "ipython", "traitlets", "aiohttp", "aiohappyeyeballs",
    "aiosignal", "frozenlist", "multidict", "yarl", "propcache", "attrs", "dill",
    "sentencepiece==0.2.1", "apache-tvm-ffi==0.1.11", "torchvision==0.29.1",
]
# vLLM subpackages imported by vllm.lora.punica_wrapper.{punica_base,punica_cpu} and
# vllm.lora.ops.torch_ops (checked by importing them from the unpacked tree).
VLLM_TREES = ("vllm/logging_utils/", "vllm/lora/", "vllm/platforms/", "vllm/plugins/",
              "vllm/utils/")
VLLM_FILES = ("vllm/v1/__init__.py", "vllm/v1/attention/__init__.py",
              "vllm/v1/attention/backends/__init__.py",
              "vllm/v1/attention/backends/registry.py")


class _UnpinnedTorch:
    """``torch`` with ``pin_memory=`` dropped from tensor factories."""

    def __getattr__(self, name):
        import torch
        fn = getattr(torch, name)
        if name in ("zeros", "tensor", "empty", "full", "ones"):
            def call(*args, **kwargs):
                kwargs.pop("pin_memory", None)
                return fn(*args, **kwargs)
            return call
        return fn


def unpin_sglang_torch_native(monkeypatch=None):
    """Let SGLang's torch_native backend prepare batches on a CPU-only machine: it stages
    host copies in pinned memory, which needs a CUDA driver. With pytest's ``monkeypatch``
    the change is undone after the test; without, it lasts for the process (bench --quick)."""
    import torch
    from sglang.srt.lora.backend import torch_backend

    def no_pin(self, *args, **kwargs):
        return self

    if monkeypatch is None:
        torch_backend.torch = _UnpinnedTorch()
        torch.Tensor.pin_memory = no_pin
    else:
        monkeypatch.setattr(torch_backend, "torch", _UnpinnedTorch())
        monkeypatch.setattr(torch.Tensor, "pin_memory", no_pin)


def vllm_src_dir(prefix: str = sys.prefix) -> Path:
    return Path(prefix) / "engine-src" / f"vllm-{VLLM_VERSION}"


def _pip(*args: str) -> None:
    subprocess.check_call([sys.executable, "-m", "pip", *args])


def _wanted(name: str) -> bool:
    if name.startswith(f"vllm-{VLLM_VERSION}.dist-info/"):
        return name.endswith(("METADATA", "entry_points.txt", "top_level.txt"))
    if not name.endswith(".py"):
        return False
    top = name.count("/") == 1 and name.startswith("vllm/")
    return top or name.startswith(VLLM_TREES) or name in VLLM_FILES


def install_sglang() -> None:
    _pip("install", "-q", "--no-deps", f"sglang=={SGLANG_VERSION}", *SGLANG_LIGHT_DEPS)


def install_vllm(dest: Path) -> None:
    if (dest / "vllm" / "lora" / "punica_wrapper" / "punica_base.py").exists():
        return
    with tempfile.TemporaryDirectory() as tmp:
        _pip("download", "-q", "--no-deps", f"vllm=={VLLM_VERSION}", "-d", tmp)
        wheel = next(Path(tmp).glob("vllm-*.whl"))
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(dest, [n for n in zf.namelist() if _wanted(n)])


def _torch_version() -> str:
    return subprocess.check_output([sys.executable, "-c", "import torch; print(torch.__version__)"],
                                   text=True).strip()


def download_wheels(dest: Path) -> None:
    deps = [d for d in SGLANG_LIGHT_DEPS if not d.startswith("torchvision")]
    _pip("download", "-q", "--no-deps", "--only-binary", ":all:", "-d", str(dest),
         f"sglang=={SGLANG_VERSION}", *deps)


def main(argv) -> int:
    if argv[1:2] == ["wheels"]:
        download_wheels(Path(argv[2] if len(argv) > 2 else ".whl"))
        return 0
    which = argv[1:] or ["sglang", "vllm"]
    before = _torch_version()
    for engine in which:
        if engine == "sglang":
            install_sglang()
        elif engine == "vllm":
            install_vllm(vllm_src_dir())
        else:
            print(f"unknown engine {engine!r}; choose sglang or vllm", file=sys.stderr)
            return 2
    after = _torch_version()
    if after != before:  # every install is --no-deps, so this would be a bug here
        print(f"torch changed from {before} to {after}", file=sys.stderr)
        return 1
    print(f"engine test env ready ({', '.join(which)}); torch {after} unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
