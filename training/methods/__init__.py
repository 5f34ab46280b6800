"""Registry of training methods: one file each, all implementing ``base.Method``."""
from __future__ import annotations

import torch.nn as nn

from ..config import AuxConfig, ConfigError
from .advsemseg import AdvSemSeg
from .base import Method, StepContext
from .cct import CCT
from .contextrast import Contextrast
from .cps import CPS
from .cutmixseg import CutMixSeg
from .fixmatch import FixMatch
from .gct import GCT
from .meanteacher import MeanTeacher
from .pseudoseg import PseudoSeg
from .prcl import PRCL
from .psmt import PSMT
from .rankmatch import RankMatch
from .scalematch import ScaleMatch
from .selftrain import SelfTrain
from .supervised import Supervised
from .unimatch import UniMatch

METHODS: dict[str, type[Method]] = {m.name: m for m in (Supervised, FixMatch, UniMatch, MeanTeacher, CPS, ScaleMatch,
                                                         PseudoSeg, CCT, PSMT, CutMixSeg, RankMatch, PRCL,
                                                         AdvSemSeg, GCT, SelfTrain)}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


AUX_LOSSES: dict[str, type[nn.Module]] = {"contextrast": Contextrast}


def build_aux(cfg: AuxConfig, model: nn.Module, num_classes: int) -> nn.Module:
    """The auxiliary loss ``--aux`` names, with its training-only heads sized for ``model``."""
    if cfg.aux not in AUX_LOSSES:
        raise ConfigError(f"--aux {cfg.aux!r}: unknown auxiliary loss; choose {', '.join(AUX_LOSSES)} (or leave it empty).")
    return AUX_LOSSES[cfg.aux](cfg, model, num_classes)


__all__ = ["AUX_LOSSES", "METHODS", "Method", "StepContext", "build_aux", "get_method"]
