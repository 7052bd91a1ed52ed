"""The ``cuda`` backend on the compiled extension ``lora_kernels._C`` (built from csrc/ by
setup.py; ``make ext``), in three parts:

* :mod:`.loader` — loads the .so once and keeps why it failed (:func:`why_unavailable`);
* :mod:`.backend` — the kernel-level API of docs/BACKENDS.md on the ``cuda_*`` ops
  (:mod:`.cutlass_gemm` decides when the CUTLASS sm90 GEMM serves a call);
* :mod:`.fakes` — their fake kernels, registered here once the ops exist.

The op schemas have one home, csrc/ (``m.def``); the C++ library names this package as the
module of their fakes. Importing this package never raises: an absent extension is reported by
:func:`why_unavailable`, and every API function then raises with the build hint.
"""

from lora_kernels._ext import fakes
from lora_kernels._ext.backend import (
    FUSED_DECODE_MAX_RANK_ROWS, FUSED_DECODE_MAX_TOKENS, MAX_SLICES, PATH_AUTO, PATH_DECODE,
    PATH_PREFILL, dropout_keep_mask, lora_expand, lora_linear_bwd, lora_linear_fwd,
    lora_shrink, multi_lora_fwd,
)
from lora_kernels._ext.backend import _i64  # noqa: F401  (the seed convention; tests use it)
from lora_kernels._ext.loader import BUILD_HINT as _BUILD_HINT  # noqa: F401  (tests, old name)
from lora_kernels._ext.loader import why_no_cutlass, why_unavailable

__all__ = [
    "FUSED_DECODE_MAX_RANK_ROWS", "FUSED_DECODE_MAX_TOKENS", "MAX_SLICES", "PATH_AUTO",
    "PATH_DECODE", "PATH_PREFILL", "dropout_keep_mask", "lora_expand", "lora_linear_bwd",
    "lora_linear_fwd", "lora_shrink", "multi_lora_fwd", "why_no_cutlass", "why_unavailable",
]

if why_unavailable() is None:
    fakes.register()
