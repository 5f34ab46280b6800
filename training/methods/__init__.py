"""Registry of training methods: one file each, all implementing ``base.Method``."""
from __future__ import annotations

from .advsemseg import AdvSemSeg
from .base import Method, StepContext
from .cps import CPS
from .fixmatch import FixMatch
from .gct import GCT
from .meanteacher import MeanTeacher
from .scalematch import ScaleMatch
from .supervised import Supervised
from .unimatch import UniMatch

METHODS: dict[str, type[Method]] = {m.name: m for m in (Supervised, FixMatch, UniMatch, MeanTeacher, CPS, ScaleMatch,
                                                          AdvSemSeg, GCT)}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "Method", "StepContext", "get_method"]
