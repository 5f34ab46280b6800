"""Labelled, unlabelled and evaluation datasets over the folder format, and the resumable sampler.

The sampler yields ``(index, augmentation_seed)`` pairs. Both come from (seed, stream, epoch, position)
alone, so an interrupted run that resumes at iteration i sees exactly the samples and augmentations an
uninterrupted run would, and every process of a DDP job draws a disjoint share of one global order.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from . import transforms as T
from .folder import IGNORE, image_path, load_image, load_mask, mask_path, read_mask


def _generator(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


class LabeledSet(Dataset):
    """(x_l, y_l) under the weak augmentation; the mask is padded with 255 (ignore)."""

    def __init__(self, root: str | Path, ids: list[str], num_classes: int, crop: int, scale: tuple[float, float]):
        self.root, self.ids, self.num_classes, self.crop, self.scale = Path(root), ids, num_classes, crop, scale

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        image_id = self.ids[index]
        img = load_image(image_path(self.root, image_id, "labeled"))
        mask = Image.fromarray(load_mask(mask_path(self.root, image_id), self.num_classes, img.size))
        img, mask = T.weak(img, mask, _generator(seed), self.crop, self.scale, IGNORE)
        return {"image": T.to_tensor(img), "mask": T.mask_to_tensor(mask)}


class UnlabeledSet(Dataset):
    """x_u: the weak view, ``num_strong`` strong views with one CutMix box each, and the padding mask."""

    def __init__(self, root: str | Path, ids: list[str], crop: int, scale: tuple[float, float], num_strong: int):
        self.root, self.ids, self.crop, self.scale, self.num_strong = Path(root), ids, crop, scale, num_strong

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        rng = _generator(seed)
        img = load_image(image_path(self.root, self.ids[index], "unlabeled"))
        blank = Image.new("L", img.size, 0)
        img, pad = T.weak(img, blank, rng, self.crop, self.scale, T.UNLABELED_PAD)
        sample = {"weak": T.to_tensor(img), "ignore": T.ignore_from_padding(pad)}
        for k in range(1, self.num_strong + 1):
            sample[f"strong{k}"] = T.to_tensor(T.strong(img, rng))
            sample[f"box{k}"] = T.cutmix_box(self.crop, rng)
        return sample


class PseudoLabeledSet(Dataset):
    """Unlabelled images with the masks a teacher predicted for them (offline self-training): the weak
    augmentation, then optionally the strong one and a CutMix box (the step pastes the next image of the batch
    into it). ``label_dirs`` maps each id to the cache folder holding labels/<id>.png and confidence/<id>.png;
    pixels whose confidence (stored as 0-255) is below ``conf_thresh`` are ignored."""

    def __init__(self, root: str | Path, ids: list[str], label_dirs: dict[str, Path], crop: int, scale: tuple[float, float],
                 strong: bool, conf_thresh: float = 0.0):
        self.root, self.ids, self.label_dirs, self.crop, self.scale = Path(root), ids, label_dirs, crop, scale
        self.strong, self.conf_thresh = strong, conf_thresh

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        rng = _generator(seed)
        image_id = self.ids[index]
        img = load_image(image_path(self.root, image_id, "unlabeled"))
        folder = self.label_dirs[image_id]
        mask = read_mask(folder / "labels" / f"{image_id}.png")
        if self.conf_thresh > 0:
            confidence = read_mask(folder / "confidence" / f"{image_id}.png")
            mask = np.where(confidence < round(self.conf_thresh * 255), IGNORE, mask).astype(np.uint8)
        img, mask = T.weak(img, Image.fromarray(mask), rng, self.crop, self.scale, IGNORE)
        box = torch.zeros(self.crop, self.crop, dtype=torch.uint8)
        if self.strong:
            img, box = T.strong(img, rng), T.cutmix_box(self.crop, rng)
        return {"image": T.to_tensor(img), "mask": T.mask_to_tensor(mask), "box": box, "pseudo": torch.tensor(True)}


class MixedSet(Dataset):
    """Labelled images repeated to at least the pseudo-labelled pool's size, then the pool (ST++'s
    semi_train set), so a batch holds about as many of each; labelled samples get an empty CutMix box."""

    def __init__(self, labeled: LabeledSet, pseudo: PseudoLabeledSet):
        self.labeled, self.pseudo = labeled, pseudo
        self.repeated = len(labeled) * max(1, math.ceil(len(pseudo) / len(labeled)))

    def __len__(self) -> int:
        return self.repeated + len(self.pseudo)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        if index >= self.repeated:
            return self.pseudo[(index - self.repeated, seed)]
        sample = self.labeled[(index % len(self.labeled), seed)]
        crop = self.labeled.crop
        return {**sample, "box": torch.zeros(crop, crop, dtype=torch.uint8), "pseudo": torch.tensor(False)}


class EvalSet(Dataset):
    """Whole images and masks at their own size, for validation and `scaleseg eval` (batch size 1). Images are
    normalised float32, or with ``normalise=False`` uint8 [3, H, W] as a model package's graph takes them."""

    def __init__(self, root: str | Path, ids: list[str], num_classes: int, split: str = "val", normalise: bool = True):
        self.root, self.ids, self.num_classes, self.split = Path(root), ids, num_classes, split
        self.normalise = normalise

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        img = load_image(image_path(self.root, image_id, self.split))
        mask = load_mask(mask_path(self.root, image_id), self.num_classes, img.size)
        image = T.to_tensor(img) if self.normalise else torch.from_numpy(np.array(img)).permute(2, 0, 1)
        return {"image": image, "mask": torch.from_numpy(mask.astype(np.int64)), "id": image_id}


class EpochSampler(Sampler):
    """One epoch of ``(index, aug_seed)`` for one process, resumable at any iteration.

    The global order is ``total`` positions filled with fresh permutations of the dataset (a short
    labelled list repeats to the unlabelled epoch's length). Process r of w takes positions r, r+w, ...
    """

    def __init__(self, dataset_len: int, per_process: int, seed: int, stream: int,
                 rank: int = 0, world: int = 1):
        if dataset_len == 0:
            raise ValueError("empty dataset")
        self.n, self.per_process, self.seed, self.stream = dataset_len, per_process, seed, stream
        self.rank, self.world = rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        self.epoch, self.start = epoch, start_sample

    def _global_order(self) -> np.ndarray:
        total = self.per_process * self.world
        reps = math.ceil(total / self.n)
        perms = [_generator(self._seed(0, k)).permutation(self.n) for k in range(reps)]
        return np.concatenate(perms)[:total]

    def _seed(self, kind: int, k: int) -> int:
        """kind 0: k-th permutation of the epoch; kind 1: augmentation of position k."""
        return int(np.random.SeedSequence([self.seed, self.stream, self.epoch, kind, k]).generate_state(1)[0])

    def __iter__(self):
        order = self._global_order()
        for pos in range(self.rank + self.start * self.world, len(order), self.world):
            yield int(order[pos]), self._seed(1, pos)

    def __len__(self) -> int:
        return self.per_process - self.start


def collate(samples: list[dict]) -> dict:
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
