"""Offline self-training, ST and ST++ (Yang et al., CVPR 2022; LiheYoung/ST-PlusPlus, main.py): a finished
teacher labels the unlabelled images once, and the student trains on labelled and pseudo-labelled images
with the supervised step (one mixed batch, one cross-entropy), strongly augmented where pseudo-labelled.

The run's schedule is split at epoch boundaries into 1 + ``rounds`` equal stages:
- stage 1: labelled + the ``reliable_fraction`` most reliable pseudo-labelled images. ST++ ranks images
  by the stability of the teacher's predictions across its checkpoints (``pseudo_labels.find_teacher``
  says which); a teacher with one checkpoint ranks by its mean confidence instead;
- stage 2 (round 1): the student re-labels the less reliable images, then trains on all (ST++);
- stage k > 2: the student re-labels every image, then trains on all.
ST++ re-trains from ImageNet weights with a full schedule per stage; here the student goes on through the
stages under one poly schedule, so a selftrain run costs what a supervised run of the same length does,
plus one labelling pass per stage (timed in each cache's manifest).
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..checkpoint import load_checkpoint, load_inference_model
from ..config import ConfigError, hp
from ..data.datasets import LabeledSet, MixedSet, PseudoLabeledSet
from ..distributed import barrier
from ..pseudo_labels import (Teacher, check_classes, file_digest, find_teacher, image_tensor, label_one, label_pool,
                             rank_images, read_manifest, soft_label, stability, weights_digest)
from .base import Method, StepContext, paste

PSEUDO = "pseudo"  # OUT/pseudo/teacher/ holds the teacher's labels, OUT/pseudo/round<k>/ the student's of round k
STUDENT_INITS = ("pretrained", "teacher")


def reliable_count(fraction: float, n: int) -> int:
    """How many of ``n`` ranked unlabelled images the first stage trains on."""
    return max(1, int(fraction * n))  # ST++ takes len // 2


@dataclass
class SelfTrainConfig:
    teacher: str = hp("", "the teacher: a `scaleseg train` --out folder, a model package folder, or a .pt checkpoint")
    reliable_fraction: float = hp(0.5, "share of unlabelled images, most reliable first, in the first stage (ST++ 0.5; 1 = ST)")
    rounds: int = hp(1, "re-labelling rounds after the first stage: round 1 re-labels the less reliable images (ST++), later ones all")
    conf_thresh: float = hp(0.0, "ignore pseudo-labelled pixels below this confidence; 0 keeps whole masks (ST++)")
    strong_aug: bool = hp(True, "colour jitter, grayscale, blur and CutMix on pseudo-labelled images (ST++); false: weak only")
    student_init: str = hp("pretrained", "the student starts from --pretrained as ST++ does (random if none), or from the teacher")
    label_scales: tuple = hp((0.75, 1.0, 1.25), "scales whose softmax is averaged for pseudo-labels without CIF (ST++ 0.5-2.0)")
    cif_scales: tuple = hp((0.5, 2.0), "scales CIF fuses with x1 for pseudo-labels, teacher with CIF (ScaleMatch's multi-scale inference)")
    cif_labels: bool = hp(True, "label by CIF fusion where the teacher has CIF; false: by --label-scales as for any teacher")
    label_flip: bool = hp(True, "also average the horizontally flipped image's prediction")


class SelfTrain(Method):
    name = "selftrain"
    Config = SelfTrainConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher: Teacher | None = None
        self.relabelled: set[int] = set()  # stages whose student labels this process has made or found
        self.current_stage = -1

    # --- set-up ------------------------------------------------------------------------------------
    def check_settings(self) -> None:
        cfg = self.cfg
        if not 0 < cfg.reliable_fraction <= 1:
            raise ConfigError(f"--reliable-fraction {cfg.reliable_fraction}: must be in (0, 1] (ST++ 0.5; 1 trains on all at once).")
        if cfg.rounds < 0:
            raise ConfigError(f"--rounds {cfg.rounds}: must be 0 or more.")
        if not 0 <= cfg.conf_thresh < 1:
            raise ConfigError(f"--conf-thresh {cfg.conf_thresh}: must be in [0, 1); 0 keeps whole masks.")
        if cfg.student_init not in STUDENT_INITS:
            raise ConfigError(f"--student-init {cfg.student_init!r}: choose {' or '.join(STUDENT_INITS)}.")
        if not cfg.label_scales or not all(0 < s <= 4 for s in (*cfg.label_scales, *cfg.cif_scales)):
            raise ConfigError("--label-scales and --cif-scales: each scale must be in (0, 4], e.g. 0.75,1,1.25.")

    def prepare(self, trainer) -> None:
        """Check the settings and the teacher, then label the unlabelled images with it (or find them
        labelled), before the run writes anything else: a killed labelling pass leaves only its cache, and
        the same command continues it. A new run forgets an earlier run's student labels; --student-init
        teacher becomes the run's --init-from."""
        self.check_settings()
        epochs = math.ceil(trainer.total_iters / trainer.iters_per_epoch)
        if epochs < self.cfg.rounds + 1:
            raise ConfigError(f"--rounds {self.cfg.rounds}: {1 + self.cfg.rounds} stages need {1 + self.cfg.rounds} epochs, but "
                              f"{trainer.total_iters} training iterations give {epochs} (an epoch is one pass over the unlabelled "
                              f"images, {trainer.iters_per_epoch} iterations here). Raise --max-iters or lower --rounds.")
        self.teacher = find_teacher(self.cfg.teacher)
        for path in dict.fromkeys([self.teacher.label_file, *self.teacher.rank_files]):
            check_classes(path, load_checkpoint(path), trainer.classes)
        run = trainer.cfg
        if self.cfg.student_init == "teacher" and not run.run.resume and not run.model.init_from:
            run.model.init_from = str(self.teacher.label_file)
        if not run.run.resume and trainer.dist.is_main:
            for folder in (trainer.out / PSEUDO).glob("round*"):
                shutil.rmtree(folder)
        if trainer.dist.is_main:
            self.label_with_teacher(trainer)
        barrier()  # the other processes read the cache the main one wrote

    # --- stages ------------------------------------------------------------------------------------
    def stage(self, trainer, epoch: int) -> int:
        """0 for the first stage, k for round k's."""
        epochs = math.ceil(trainer.total_iters / trainer.iters_per_epoch)
        return min(self.cfg.rounds, epoch * (self.cfg.rounds + 1) // epochs)

    def stage_start(self, trainer, stage: int) -> int:
        """The iteration at which ``stage`` begins."""
        epoch = 0
        while self.stage(trainer, epoch) < stage:
            epoch += 1
        return epoch * trainer.iters_per_epoch

    def n_reliable(self, n: int) -> int:
        return reliable_count(self.cfg.reliable_fraction, n)

    def ranked(self, trainer) -> tuple[list[str], str]:
        """The unlabelled ids, most reliable first, from the teacher's cache, and the criterion."""
        images = read_manifest(trainer.out / PSEUDO / "teacher")["images"]
        return rank_images({i: images[i] for i in trainer.unlabeled_ids})

    def training_sets(self, trainer, epoch: int) -> list:
        stage = self.stage(trainer, epoch)
        if stage > 0 and stage not in self.relabelled:
            if trainer.dist.is_main:
                self.label_with_student(trainer, stage)
            barrier()
            self.relabelled.add(stage)
        pseudo = trainer.out / PSEUDO
        order, by = self.ranked(trainer)
        dirs = dict.fromkeys(order, pseudo / "teacher")
        reliable = self.n_reliable(len(order))
        if stage == 0:
            ids = order[:reliable]
        else:
            ids = order
            dirs.update(dict.fromkeys(order[reliable:] if stage == 1 else order, pseudo / f"round{stage}"))
        d = trainer.cfg.data
        scale = (d.scale_min, d.scale_max)
        labeled = LabeledSet(trainer.root, trainer.labeled_ids, len(trainer.classes), d.crop_size, scale)
        if stage != self.current_stage and trainer.progress:
            source = "the teacher's" if stage == 0 else "the teacher's and the student's" if stage == 1 else "the student's"
            tqdm.write(f"selftrain stage {stage + 1} of {self.cfg.rounds + 1}: {len(labeled)} labelled + {len(ids)} of "
                       f"{len(order)} unlabelled images with {source} labels (most reliable by {by} first)")
        self.current_stage = stage
        return [MixedSet(labeled, PseudoLabeledSet(trainer.root, ids, dirs, d.crop_size, scale, self.cfg.strong_aug,
                                                   self.cfg.conf_thresh))]

    # --- labelling ---------------------------------------------------------------------------------
    @staticmethod
    def log(trainer):
        """Messages beside the progress bars, only where progress is shown."""
        return tqdm.write if trainer.progress else (lambda message: None)

    def label_with_teacher(self, trainer) -> None:
        cfg, teacher, device = self.cfg, self.teacher, trainer.device
        ckpt = load_checkpoint(teacher.label_file)
        cif = ckpt["inference"]["cif"] and cfg.cif_labels
        identity = {"teacher": file_digest(teacher.label_file), "ranked_by": [file_digest(p) for p in teacher.rank_files],
                    "mode": "cif" if cif else "multiscale", "scales": list(cfg.cif_scales if cif else cfg.label_scales),
                    "flip": cfg.label_flip}
        models: dict = {}

        def network(path: Path):
            if path not in models:
                models[path] = load_inference_model(ckpt if path == teacher.label_file else load_checkpoint(path), path)[0].to(device)
            return models[path]

        def label(image_id: str) -> dict:
            x = image_tensor(trainer.root, image_id, device)
            probs = soft_label(network(teacher.label_file), x, cfg.label_scales, cfg.label_flip, cfg.cif_scales if cif else None)
            stats = label_one(trainer.out / PSEUDO / "teacher", image_id, probs)
            ranked = [network(p) for p in teacher.rank_files]
            stats["stability"] = round(stability(ranked, x, len(trainer.classes)), 3) if ranked else None
            return stats

        if trainer.progress:
            how = (f"CIF fusion of x{', x'.join(map(str, sorted({1.0, *cfg.cif_scales})))}" if cif
                   else f"mean softmax over x{', x'.join(map(str, cfg.label_scales))}") + (" + flip" if cfg.label_flip else "")
            rank = (f"stability over {len(teacher.rank_files)} checkpoints" if teacher.rank_files else
                    "mean confidence (the teacher has one checkpoint; train it with --snapshot-every for ST++'s stability ranking)")
            tqdm.write(f"selftrain: teacher {teacher.label_file} ({ckpt['method']}, iteration {ckpt['iteration']}), "
                       f"labels by {how}; images ranked by {rank}")
        label_pool(trainer.out / PSEUDO / "teacher", identity, trainer.unlabeled_ids, label, rebuild=trainer.cfg.run.force,
                   desc="pseudo-labels (teacher)", progress=trainer.progress, log=self.log(trainer))

    def label_with_student(self, trainer, stage: int) -> None:
        """Round ``stage``'s labels by the student as it is when the stage begins. A finished cache of this
        round and boundary is reused (a resumed run); an unfinished one is continued only by the same
        weights, else made again."""
        cfg = self.cfg
        folder = trainer.out / PSEUDO / f"round{stage}"
        order, _ = self.ranked(trainer)
        ids = order[self.n_reliable(len(order)):] if stage == 1 else order
        if not ids:
            return
        base = {"round": stage, "iteration": self.stage_start(trainer, stage), "scales": list(cfg.label_scales),
                "flip": cfg.label_flip}
        stored = read_manifest(folder)
        if stored and stored["complete"] and {k: stored["identity"].get(k) for k in base} == base:
            identity = stored["identity"]
        else:
            identity = {**base, "student": weights_digest(self.model)}
        was_training = self.model.training
        self.model.eval()

        def label(image_id: str) -> dict:
            x = image_tensor(trainer.root, image_id, trainer.device)
            return label_one(folder, image_id, soft_label(self.model, x, cfg.label_scales, cfg.label_flip))

        try:
            label_pool(folder, identity, ids, label, rebuild=True, desc=f"pseudo-labels (student, round {stage})",
                       progress=trainer.progress, log=self.log(trainer))
        finally:
            self.model.train(was_training)

    # --- step --------------------------------------------------------------------------------------
    def training_step(self, labeled, unlabeled, partner, ctx: StepContext):
        # CutMix: each pseudo-labelled image takes its box (empty for labelled ones) from the next image of the batch.
        box, image, mask = labeled["box"], labeled["image"], labeled["mask"]
        image, mask = paste(box, image.roll(1, 0), image), paste(box, mask.roll(1, 0), mask)
        loss = self.sup_loss(self.model(image), mask)
        return {"loss": loss, "loss_x": loss.detach(), "pseudo_share": labeled["pseudo"].float().mean()}
