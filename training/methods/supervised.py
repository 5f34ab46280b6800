"""Supervised baseline: CE (or OHEM) on the weakly augmented labelled batch; no unlabelled data."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Method, StepContext


@dataclass
class SupervisedConfig:
    """No hyper-parameters beyond the shared optimiser and data settings."""


class Supervised(Method):
    name = "supervised"
    Config = SupervisedConfig
    uses_unlabeled = False

    def training_step(self, labeled, unlabeled, partner, ctx: StepContext):
        loss = self.sup_loss(self.model(labeled["image"]), labeled["mask"])
        return {"loss": loss, "loss_x": loss.detach()}
