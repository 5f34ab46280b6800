"""The one place for the image shapes a TensorRT engine is built for, and for every shape that is fed to it.

A TensorRT engine accepts only input shapes inside its optimisation profile (min <= shape <= max per
dimension; ``IExecutionContext.set_input_shape`` returns False otherwise). So the export build, the
warm-up after loading, the parity check, INT8 calibration and the server's request limits all take their
shapes from a ``Profile`` here, and tests check that each of them lies inside it. Pure Python: export
imports this module, serving reads the profile an engine was built with from its JSON sidecar.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class Profile:
    """Square side limits (pixels) and batch limits of the ``image`` input [N, 3, H, W]."""
    min_side: int = 64
    opt_side: int = 512
    max_side: int = 1024
    opt_batch: int = 4
    max_batch: int = 8

    def __post_init__(self):
        if not (1 <= self.min_side <= self.opt_side <= self.max_side and 1 <= self.opt_batch <= self.max_batch):
            raise ValueError(f"inconsistent profile {self}: need 1 <= min_side <= opt_side <= max_side and "
                             "1 <= opt_batch <= max_batch")

    @property
    def min_shape(self) -> tuple[int, int, int, int]:
        return (1, 3, self.min_side, self.min_side)

    @property
    def opt_shape(self) -> tuple[int, int, int, int]:
        return (self.opt_batch, 3, self.opt_side, self.opt_side)

    @property
    def max_shape(self) -> tuple[int, int, int, int]:
        return (self.max_batch, 3, self.max_side, self.max_side)

    def exceeds(self, shape: tuple[int, ...]) -> str | None:
        """Why an input of ``shape`` [N, 3, H, W] is too large for an engine of this profile, or None."""
        n, _, h, w = shape
        if n > self.max_batch:
            return f"a batch of {n} images exceeds this engine's maximum of {self.max_batch}"
        if max(h, w) > self.max_side:
            return f"{w}x{h} images exceed this engine's maximum side of {self.max_side} px"
        return None

    def below(self, shape: tuple[int, ...]) -> str | None:
        """Why an input of ``shape`` [N, 3, H, W] is too small for an engine of this profile, or None."""
        n, _, h, w = shape
        if n < 1:
            return "a batch needs at least one image"
        if min(h, w) < self.min_side:
            return f"{w}x{h} images are below this engine's minimum side of {self.min_side} px"
        return None

    def contains(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == 4 and shape[1] == 3 and not self.exceeds(shape) and not self.below(shape)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Profile:
        """The profile recorded in an engine's sidecar; a missing or foreign field is an error, not a guess."""
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names or not all(isinstance(v, int) for v in data.values()):
            raise ValueError(f"engine profile must have integer fields {sorted(names)}, got {data!r}")
        return cls(**data)


PROFILE = Profile()
# Warm-up after loading: the smallest input the engine takes, so it is cheap and always inside the profile.
WARMUP_SHAPE = PROFILE.min_shape
# Parity check (export verify): two sizes that are not multiples of each other, and two batch sizes.
PARITY_SIZES = ((96, 128), (160, 160))
PARITY_BATCHES = (1, 3)


def engine_profile(min_side: int | None = None, opt_side: int | None = None, max_side: int | None = None,
                   max_batch: int | None = None) -> Profile:
    """The profile of `export --engine-min-side/--engine-opt-side/--engine-max-side/--engine-max-batch`; an
    unset value keeps the default, with the opt side and opt batch clamped into the limits that were set (a
    --engine-max-side 384 alone gives opt side 384, not an inconsistent 512). ValueError names the flags."""
    low = PROFILE.min_side if min_side is None else min_side
    high = PROFILE.max_side if max_side is None else max_side
    opt = min(max(PROFILE.opt_side, low), high) if opt_side is None else opt_side
    batch = PROFILE.max_batch if max_batch is None else max_batch
    if not 1 <= low <= opt <= high:
        raise ValueError(f"engine sides must satisfy 1 <= --engine-min-side ({low}) <= --engine-opt-side ({opt}) "
                         f"<= --engine-max-side ({high})")
    if batch < 1:
        raise ValueError(f"--engine-max-batch must be at least 1, got {batch}")
    return Profile(low, opt, high, min(PROFILE.opt_batch, batch), batch)


def parity_shapes(profile: Profile | None) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    """(sizes, batch sizes) of the parity check for a package whose engine has ``profile`` (None: no engine).
    The defaults where they fit; otherwise two sizes inside the engine's sides, neither a multiple of the other
    where the sides allow, and batches of 1 and up to 3."""
    batches = PARITY_BATCHES
    if profile is None or all(profile.contains((n, 3, *size)) for size in PARITY_SIZES for n in batches):
        return PARITY_SIZES, batches
    low, high = profile.min_side, profile.max_side
    sizes = ((low, min(high, low * 4 // 3)), (min(high, low * 5 // 3),) * 2)
    return tuple(dict.fromkeys(sizes)), tuple(dict.fromkeys(min(n, profile.max_batch) for n in batches))


def warmup_shape(profile: Profile | None) -> tuple[int, int, int, int]:
    """Warm-up input for a backend with this engine profile (None: any shape runs, use the default)."""
    return (profile or PROFILE).min_shape


def calibration_batches(num_images: int, profile: Profile = PROFILE) -> list[tuple[int, int]]:
    """[start, stop) image ranges for the INT8 calibrator: every batch holds exactly ``opt_batch`` images,
    the size TensorRT reads from the buffer, so a short last batch is dropped rather than read past its end."""
    if num_images < profile.opt_batch:
        raise ValueError(f"INT8 calibration needs at least {profile.opt_batch} images (the profile's opt batch), "
                         f"got {num_images}")
    n = profile.opt_batch
    return [(start, start + n) for start in range(0, num_images - n + 1, n)]
