"""Optional TensorBoard logging of the records the loop writes to metrics.jsonl."""
from __future__ import annotations

from pathlib import Path

from .config import ConfigError


class TensorBoard:
    """Training scalars under ``train/`` (losses, lr, mask_ratio, ...) and validation mIoU per input
    scale under ``val/``, indexed by iteration."""

    def __init__(self, logdir: Path):
        """Checks the package is there (before a run starts); ``open`` creates the event file."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install 'scaleseg[tensorboard]' "
                              "(or drop --tensorboard; metrics.jsonl has the same numbers).") from err
        self.logdir, self.writer_cls, self.writer = logdir, SummaryWriter, None

    def open(self) -> None:
        self.writer = self.writer_cls(str(self.logdir))

    def write(self, record: dict) -> None:
        step = record["iter"]
        if "val_miou_by_scale" in record:
            for scale, miou in record["val_miou_by_scale"].items():
                self.writer.add_scalar(f"val/miou_x{scale}", miou, step)
            for name, iou in record["val"]["iou"].items():
                if iou is not None:
                    self.writer.add_scalar(f"val_iou_x1.0/{name}", iou, step)
            return
        for key, value in record.items():
            if key not in ("iter", "epoch") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        self.writer.close()
