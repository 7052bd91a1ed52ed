"""The frozen description of one GEMM-core variant and the list of legal ones.

A :class:`GemmSpec` names the variant along six axes; :func:`legal_specs` is the one list the
sm_90 compile test and ``bench/sass_report.py`` iterate, and :meth:`GemmSpec.constexprs` is
what the kernel receives. A new variant adds a value here, a branch in one loader or epilogue
step, and (if legal) shows up in both tests by itself.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

from lora_kernels.triton.gemm import modes as MD

WEIGHT = {"dense": MD.WEIGHT_DENSE, "nf4": MD.WEIGHT_NF4, "nf4_nested": MD.WEIGHT_NF4_NESTED,
          "fp8_e4m3": MD.WEIGHT_FP8_E4M3, "fp8_act": MD.WEIGHT_FP8_ACT}
ROWS = {"dense": MD.ROWS_DENSE, "gathered": MD.ROWS_GATHERED}
LOWRANK = {"none": MD.LORA_NONE, "seeded": MD.LORA_SEEDED, "in_loop": MD.LORA_IN_LOOP,
           "per_slot": MD.LORA_PER_SLOT, "panel": MD.LORA_PANEL}
COL_SCALE = {"none": MD.COL_SCALE_NONE, "vector": MD.COL_SCALE_VECTOR}
SCHEDULE = {"tiles": MD.SCHED_TILES, "split_k": MD.SCHED_SPLIT_K,
            "persistent": MD.SCHED_PERSISTENT}
STORE = {"pointer": MD.STORE_POINTER, "tma": MD.STORE_TMA}


def illegal_reason(weight, rows, lowrank, col_scale, schedule, store) -> str:
    """Why a combination is not built ('' when it is legal)."""
    gathered = rows == "gathered"
    if gathered != (lowrank == "per_slot"):
        return "gathered rows go with (only) the per-slot low-rank term (multi-adapter)"
    if gathered and (schedule != "tiles" or store != "pointer" or col_scale != "none"):
        return "the multi-adapter GEMM runs on pointer tiles without a column scale"
    if weight == "fp8_act":
        if rows != "dense" or lowrank not in ("none", "seeded") or col_scale != "none" \
                or schedule == "split_k":
            return ("the fp8 x fp8 GEMM (fp8_act) runs on dense rows, tiles or persistent, with "
                    "no or the seeded low-rank term (xa from the quantizer's pass over x) and "
                    "its own row x column scale (no DoRA column scale, no split-K: the scales "
                    "apply to the whole K sum)")
        return "" if store == "pointer" or schedule == "persistent" else \
            "tensor descriptors are built once per program: persistent schedule only"
    if weight != "dense" and (store != "pointer" or col_scale != "none"
                              or schedule == "persistent"):
        return ("a quantized (4-bit / fp8) weight is gathered by pointer, tiles or split-K "
                "(dense rows) or the multi-adapter tiles (gathered rows), no column scale "
                "(no TMA box of nibbles; DoRA over it not built)")
    if lowrank == "panel" and schedule != "persistent":
        return "the panel-shared x·Aᵀ is made one wave ahead: persistent schedule only"
    if store == "tma" and schedule != "persistent":
        return "tensor descriptors are built once per program: persistent schedule only"
    return ""


@dataclass(frozen=True)
class GemmSpec:
    weight: str = "dense"
    rows: str = "dense"
    lowrank: str = "none"
    col_scale: str = "none"
    schedule: str = "tiles"
    store: str = "pointer"

    def __post_init__(self):
        for name, table in (("weight", WEIGHT), ("rows", ROWS), ("lowrank", LOWRANK),
                            ("col_scale", COL_SCALE), ("schedule", SCHEDULE), ("store", STORE)):
            if getattr(self, name) not in table:
                raise ValueError(f"GemmSpec.{name}={getattr(self, name)!r}; one of {sorted(table)}")
        why = illegal_reason(**asdict(self))
        if why:
            raise ValueError(f"illegal GemmSpec {self}: {why}")

    @property
    def name(self) -> str:
        return "-".join(v for v in asdict(self).values())

    def constexprs(self) -> dict:
        """The kernel's mode arguments for this spec."""
        return dict(WEIGHT=WEIGHT[self.weight].value, ROWS=ROWS[self.rows].value,
                    LORA=LOWRANK[self.lowrank].value, COL_SCALE=COL_SCALE[self.col_scale].value,
                    SCHEDULE=SCHEDULE[self.schedule].value, STORE=STORE[self.store].value)


def legal_specs() -> list[GemmSpec]:
    """Every buildable variant, in a fixed order."""
    axes = ("weight", "rows", "lowrank", "col_scale", "schedule", "store")
    combos = (dict(zip(axes, c)) for c in
              itertools.product(WEIGHT, ROWS, LOWRANK, COL_SCALE, SCHEDULE, STORE))
    return [GemmSpec(**c) for c in combos if not illegal_reason(**c)]
