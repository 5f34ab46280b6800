"""Encoder weights: where ``--pretrained`` finds them and how a state dict is checked before it loads.

``--pretrained`` is ``imagenet`` (each encoder knows its published weights), ``none`` for random init, or
a local file. A file is read with ``weights_only`` (a weights file must never run code); its keys may sit
under ``state_dict`` / ``model`` and carry ``module.`` / ``backbone.`` / ``encoder.`` prefixes (DDP and
the semi-supervised repositories' checkpoints). Anything but the ignored classifier keys must match.
"""
from __future__ import annotations

import urllib.error
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ...config import ConfigError

PREFIXES = ("module.", "backbone.", "encoder.")


def is_random_init(pretrained: str) -> bool:
    """'' is what checkpoints written before ImageNet weights were the default hold."""
    return pretrained.strip().lower() in ("", "none")


def read_state_dict(path: str | Path, flag: str, expect: str) -> dict[str, torch.Tensor]:
    """names -> tensors from a local file, prefixes stripped; ConfigError naming ``flag`` otherwise.
    ``expect`` says what the file should hold, e.g. 'a torchvision ResNet state dict'."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag}: file not found. Pass a local .pth file with {expect}, --pretrained imagenet "
                          "for published weights, or --pretrained none for random init.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if "Weights only load failed" in str(err):
            raise ConfigError(f"{flag}: holds pickled objects (a whole model?), not plain weights. In Python, "
                              "torch.save(model.state_dict(), 'weights.pth') and pass that file.") from None
        raise ConfigError(f"{flag}: not a PyTorch weights file ({type(err).__name__}). Pass {expect} (.pth).") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = "a tensor" if isinstance(state, torch.Tensor) else f"a {type(state).__name__} that is not names -> tensors"
        raise ConfigError(f"{flag}: holds {kind}, not a state dict. Save {expect} with torch.save and pass that file.")
    clean = {}
    for key, value in state.items():
        for prefix in PREFIXES:
            key = key[len(prefix):] if key.startswith(prefix) else key
        clean[key] = value
    return clean


def load_matching(net: nn.Module, state: dict[str, torch.Tensor], flag: str, name: str, ignore: Iterable[str],
                  explain: Callable[[dict], str | None] = lambda state: None) -> None:
    """Load ``state`` into ``net`` when every key but the ``ignore`` prefixes matches in name and shape;
    otherwise a ConfigError that says what differs (``explain`` may name the depth the file really has)."""
    ignore = tuple(ignore)
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    own = {k: v for k, v in net.state_dict().items() if not k.startswith(ignore)}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shape_mismatch = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shape_mismatch:
        reason = explain(state)
        if reason:
            raise ConfigError(f"{flag}: {reason}")
        if not set(own) & set(state):
            raise ConfigError(f"{flag}: not {name} encoder weights (no key like {next(iter(own))!r}; found e.g. "
                              f"{unexpected[:2]}).")
        raise ConfigError(
            f"{flag}: does not fit --backbone {name}: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(shape_mismatch)} with other shapes "
            f"(e.g. {shape_mismatch[:2]}).")
    net.load_state_dict(state, strict=False)


def download_once(url: str, name: str) -> dict[str, torch.Tensor]:
    """Published weights through torch.hub's cache (TORCH_HOME/hub/checkpoints): downloaded on first use
    with the SHA-256 prefix in the file name checked, read from the cache after that. Offline and not
    cached: one ConfigError naming the file, its URL and where to put it, never a silent random init."""
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, check_hash=True,
                                                  weights_only=True)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise ConfigError(f"--pretrained imagenet: {name} ImageNet weights are not cached at {target} and could not "
                          f"be downloaded ({type(err).__name__}: {err}). Download {url} to that path (or set "
                          "TORCH_HOME), pass a local file with --pretrained PATH, or --pretrained none for random "
                          "init.") from None
