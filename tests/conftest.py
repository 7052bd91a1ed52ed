"""Test set-up. Without a GPU the real Triton kernels run on the CPU interpreter, which must be
switched on before triton is first imported - hence here, before anything imports torch."""

import os
import shutil


def _has_nvidia_gpu() -> bool:
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


os.environ.setdefault("TRITON_INTERPRET", "0" if _has_nvidia_gpu() else "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(4, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
