"""The interface every training method implements, and the pieces several of them share.

A method is an ``nn.Module`` that owns its network(s). The shared loop calls it once per iteration with
a labelled batch, an unlabelled batch and (when the method asks for one) a second unlabelled batch used
as CutMix partner; it returns named losses, ``loss`` being the one to minimise. Calling the module runs
the step, so the loop can wrap it in DistributedDataParallel unchanged.
"""
from __future__ import annotations

import abc
import copy
import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..losses import pseudo_labels
from ..models import DeepLabV3Plus, build_model


@dataclass
class StepContext:
    iteration: int          # 0-based index of this step
    epoch: int              # iteration // iters_per_epoch
    total_iters: int
    iters_per_epoch: int


class Method(nn.Module, metaclass=abc.ABCMeta):
    name: ClassVar[str]
    Config: ClassVar[type]
    uses_unlabeled: ClassVar[bool] = True
    num_strong_views: ClassVar[int] = 0   # strong views the unlabelled loader must produce
    needs_partner: ClassVar[bool] = False  # a second unlabelled batch (CutMix source)
    uses_cif: ClassVar[bool] = False
    optim_defaults: ClassVar[dict] = {}    # shared optimiser settings whose paper default differs for this method

    def __init__(self, cfg, model_cfg: ModelConfig, num_classes: int,
                 supervised_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.cfg = cfg
        self.sup_loss = supervised_loss
        self.model = build_model(model_cfg, num_classes, cif=self.uses_cif)
        self.aux: nn.Module | None = None  # an auxiliary loss (--aux), attached after construction

    def forward(self, labeled: dict, unlabeled: dict | None, partner: dict | None, ctx: StepContext) -> dict:
        losses = self.training_step(labeled, unlabeled, partner, ctx)
        if self.aux is not None:
            extra = self.aux(self, labeled, unlabeled, partner, ctx)
            losses["loss"] = losses["loss"] + extra.pop("loss")
            losses.update(extra)
        return losses

    @abc.abstractmethod
    def training_step(self, labeled: dict, unlabeled: dict | None, partner: dict | None,
                      ctx: StepContext) -> dict[str, torch.Tensor]:
        """One step's named losses; ``loss`` is minimised."""

    def after_step(self, ctx: StepContext) -> None:
        """Hook after the optimiser step (EMA teachers)."""

    def prepare(self, trainer) -> None:
        """Hook once the loop (``engine.Trainer``) has its data and networks, before it restores or initialises
        their weights: a method that depends on files outside the run checks them here, so it fails before
        any training (selftrain's teacher)."""

    def training_sets(self, trainer, epoch: int) -> list | None:
        """The datasets of epoch ``epoch``'s streams, in the order the step receives their batches (labelled,
        unlabelled, partner); None keeps the loop's own. Called before each epoch's loaders are built, so a
        method may change its data between epochs (selftrain's pseudo-labelled pools)."""
        return None

    def inference_model(self) -> DeepLabV3Plus:
        """The network that is evaluated and exported."""
        return self.model

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        """Encoder at lr, everything else at lr x head_lr_mult, for every trained network and training head."""
        groups = []
        for net in self.trained_networks():
            groups.append({"params": net.encoder_parameters(), "lr": lr, "base_lr": lr})
            groups.append({"params": net.head_parameters(), "lr": lr * head_lr_mult, "base_lr": lr * head_lr_mult})
        heads = [*self.training_heads(), *([self.aux] if self.aux is not None else [])]
        params = [p for head in heads for p in head.parameters()]
        if params:  # training-only heads, the auxiliary loss's included, learn at the head rate
            groups.append({"params": params, "lr": lr * head_lr_mult, "base_lr": lr * head_lr_mult})
        return groups

    def trained_networks(self) -> list[DeepLabV3Plus]:
        return [self.model]

    def training_heads(self) -> list[nn.Module]:
        """Modules trained beside the networks but never evaluated or exported (auxiliary decoders, ...)."""
        return []

    def extra_optimizers(self) -> list[torch.optim.Optimizer]:
        """Optimisers of training-only networks kept out of ``param_groups`` (a discriminator's Adam). The loop
        zeroes and steps them with the main one after the same backward, applies the poly schedule to each
        group's ``base_lr`` and checkpoints them."""
        return []

    def init_targets(self) -> list[tuple[nn.Module, str]]:
        """(network, state-dict key prefix) pairs that ``--init-from`` loads; '' loads the whole network."""
        nets = {id(n): n for n in [*self.trained_networks(), self.inference_model()]}
        return [(net, "") for net in nets.values()]


def sigmoid_rampup(iteration: int, length: float) -> float:
    """exp(-5 (1 - t/length)^2) for t < length, then 1 (Laine & Aila; the Mean Teacher family's ramp-up)."""
    if length <= 0 or iteration >= length:
        return 1.0
    return math.exp(-5 * (1 - iteration / length) ** 2)


@torch.no_grad()
def partner_pseudo_labels(model: nn.Module, partner: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence and labels for the CutMix partner's weak view, with BN in eval mode (UniMatch)."""
    was_training = model.training
    model.eval()
    conf, label = pseudo_labels(model(partner["weak"]))
    model.train(was_training)
    return conf, label


def paste(box: torch.Tensor, inside: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """``inside`` where box == 1, ``outside`` elsewhere; box is [B, H, W], tensors [B, ...] spatial last."""
    mask = box.bool()
    if inside.dim() == 4:
        mask = mask.unsqueeze(1)
    return torch.where(mask, inside, outside)


def mixed_targets(box: torch.Tensor, conf: torch.Tensor, label: torch.Tensor, ignore: torch.Tensor,
                  p_conf: torch.Tensor, p_label: torch.Tensor, p_ignore: torch.Tensor):
    """Pseudo-label, confidence and padding mask of a CutMixed view: the partner's inside the box."""
    return paste(box, p_label, label), paste(box, p_conf, conf), paste(box, p_ignore, ignore)


def frozen_copy(net: nn.Module) -> nn.Module:
    """A copy of ``net`` that no loss trains (an EMA teacher)."""
    twin = copy.deepcopy(net)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """teacher <- alpha teacher + (1 - alpha) student over parameters and float buffers (BatchNorm
    statistics); integer buffers (batch counters) are copied."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(alpha).add_(s.detach(), alpha=1 - alpha)
    for t, s in zip(teacher.buffers(), student.buffers()):
        if t.dtype.is_floating_point:
            t.mul_(alpha).add_(s, alpha=1 - alpha)
        else:
            t.copy_(s)
