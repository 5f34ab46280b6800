"""Read intermediate tensors of a network without changing it: forward hooks that record, in call order,
what a submodule produced (or received) inside a ``with`` block. Training-only heads use these, so the
exported network stays the plain one."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn


@contextmanager
def outputs_of(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Every output of ``module`` inside the block, one per call, in call order."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _args, out: seen.append(out))
    try:
        yield seen
    finally:
        handle.remove()


@contextmanager
def inputs_of(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The first positional input of every call of ``module`` inside the block, in call order."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()
