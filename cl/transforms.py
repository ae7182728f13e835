"""Image preprocessing shared by every path into the model (streams, the Avalanche bridge, ``Session``, scripts).

One :class:`Preprocessing` (built from the ``stream`` config section and the backbone's input size ``S``) gives the
train and the eval view of an image. The pipelines are the official ones, run with ``torchvision.transforms.v2``
kernels on uint8 ``(C, H, W)`` tensors (float tensors in [0, 1] work too):

============  =====================================================  =============================================
transform     eval view                                              train view with ``augment: crop``
============  =====================================================  =============================================
``pilot``     ``Resize(round(S * 256/224), bicubic)``,               ``RandomResizedCrop(S, scale=(0.05, 1),
              ``CenterCrop(S)``                                      ratio=(3/4, 4/3), bilinear)``,
                                                                     ``RandomHorizontalFlip(0.5)``
``lae``       ``Resize(round(S * 256/224), bilinear)``,              ``RandomResizedCrop(S, scale=(0.08, 1),
              ``CenterCrop(S)``                                      ratio=(3/4, 4/3), bilinear)``, flip
``none``      ``Resize((S, S), bicubic)`` (whole image, squashed)    ``RandomResizedCrop(S, scale=(0.08, 1),
                                                                     bicubic)``, flip
============  =====================================================  =============================================

``pilot`` is LAMDA-PILOT's ``utils/data.py::build_transform`` (used unchanged by SEMA and MOS): its training
``RandomResizedCrop`` keeps torchvision's default bilinear interpolation, only the test ``Resize`` is bicubic. ``lae``
is LAE's ``libml/data/transform.py`` (``norm=False``). Small images (CIFAR's 32 px, Fashion-MNIST's 28 px) go through
the same pipeline, i.e. they are upsampled, as the papers do. No mean/std normalisation happens here: the model
normalises on the device (``cl.model.CLModel.preprocess``).

``augment`` picks the train view: ``none`` = the eval view (deterministic, what caches and SEMA's prefix cache need),
``flip`` = the eval view plus a random horizontal flip, ``crop`` = ``RandomResizedCrop`` + flip (``pilot`` is accepted
as a legacy name of ``crop``). ``interpolation`` overrides both views' interpolation; ``crop_ratio`` (eval) is
``S / resize``, 224/256 by default; 1 resizes the shorter side to ``S`` and centre-crops.

Randomness never comes from the global RNG: the train view of sample ``i`` draws from its own ``torch.Generator``
seeded by :func:`mix_seed` of (task, epoch seed, sample), in exactly the order torchvision's own
``RandomResizedCrop.make_params`` and ``RandomHorizontalFlip`` draw (so ``torch.manual_seed(s)`` + torchvision gives
the same view: ``tests/test_transforms.py``). The loop sets the epoch seed on the datasets it iterates
(:func:`set_augmentation_seed`), so runs, resumed runs and any ``num_workers`` give the same batches.

Deviations from the official code: images are resized as uint8 tensors with ``antialias=True`` instead of PIL images
(torchvision documents the two as matching up to rounding); the eval resize is ``round(S / crop_ratio)`` where the
PILOT code truncates (``int(256 / 224 * 224)``): identical at S = 224.

Decoding (:func:`decode_image`, :func:`pil_to_tensor`) converts every Pillow mode to RGB or stops with one line
naming the file and the mode; 16-bit modes are scaled to 8 bits (``round(v / 257)``: 33667 -> 131), not clipped as
Pillow's ``convert`` does. :func:`check_image_file` is the cheap scan (header + ``verify``) streams run on every file
when they are built.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from cl.errors import ConfigError, DataError

__all__ = [
    "Preprocessing",
    "TransformName",
    "Augment",
    "Interpolation",
    "mix_seed",
    "set_augmentation_seed",
    "decode_image",
    "pil_to_tensor",
    "to_chw_image",
    "check_image_file",
    "SUPPORTED_MODES",
]

TransformName = Literal["pilot", "lae", "none"]
Augment = Literal["none", "flip", "crop", "pilot"]
Interpolation = Literal["bilinear", "bicubic"]

# method defaults: (train interpolation, eval interpolation, RandomResizedCrop scale, eval crop ratio or None = squash)
_PRESETS: dict[str, tuple[Interpolation, Interpolation, tuple[float, float], float | None]] = {
    "pilot": ("bilinear", "bicubic", (0.05, 1.0), 224 / 256),
    "lae": ("bilinear", "bilinear", (0.08, 1.0), 224 / 256),
    "none": ("bicubic", "bicubic", (0.08, 1.0), None),
}
_RATIO = (3 / 4, 4 / 3)
_MASK63 = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 chained over the parts; stable across processes and platforms)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        h = (h + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & _MASK63


def set_augmentation_seed(dataset: Any, seed: int) -> int:
    """Give every dataset reachable from ``dataset`` (through ``ConcatDataset.datasets`` / ``Subset.dataset``) that
    defines ``set_augmentation_seed`` the epoch seed ``seed``; returns how many were seeded.

    The loop calls it before every epoch: non-persistent DataLoader workers start from a copy of the dataset made
    after the call, so every worker count sees the same seed.
    """
    stack, seen, count = [dataset], set(), 0
    while stack:
        ds = stack.pop()
        if id(ds) in seen:
            continue
        seen.add(id(ds))
        fn = getattr(ds, "set_augmentation_seed", None)
        if callable(fn):
            fn(seed)
            count += 1
        stack.extend(getattr(ds, "datasets", None) or ())
        inner = getattr(ds, "dataset", None)
        if isinstance(inner, torch.utils.data.Dataset):
            stack.append(inner)
    return count


@dataclass(frozen=True)
class Preprocessing:
    """The train and eval views of images for a backbone input size (see the module docstring for the pipelines).

    Attributes:
        img_size: side S of the square model input, in pixels.
        transform: pipeline family: ``pilot`` (PILOT, SEMA, MOS), ``lae`` (LAE) or ``none`` (a plain square resize).
        augment: train view: ``none`` (= eval view), ``flip``, ``crop`` (``pilot``: legacy name of ``crop``).
        interpolation: override of both views' interpolation (``None`` = the method's).
        crop_ratio: eval ``S / resize`` in (0, 1] (``None`` = the method's: 224/256, or no crop for ``none``).
    """

    img_size: int
    transform: TransformName = "pilot"
    augment: Augment = "none"
    interpolation: Interpolation | None = None
    crop_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.img_size <= 0:
            raise ConfigError(f"backbone.img_size must be positive, got {self.img_size}")
        if self.transform not in _PRESETS:
            raise ConfigError(f"stream.transform={self.transform!r}; valid choices: pilot, lae, none")
        if self.augment not in ("none", "flip", "crop", "pilot"):
            raise ConfigError(f"stream.augment={self.augment!r}; valid choices: none, flip, crop")
        if self.interpolation not in (None, "bilinear", "bicubic"):
            raise ConfigError(f"stream.interpolation={self.interpolation!r}; valid choices: bilinear, bicubic, null")
        if self.crop_ratio is not None and not 0 < self.crop_ratio <= 1:
            raise ConfigError(f"stream.crop_ratio must be in (0, 1], got {self.crop_ratio}")

    @classmethod
    def from_config(cls, stream_cfg: Any, img_size: int) -> Preprocessing:
        """From a ``stream`` config section (fields ``transform``, ``augment``, ``interpolation``, ``crop_ratio``)."""
        return cls(int(img_size), getattr(stream_cfg, "transform", "pilot"), getattr(stream_cfg, "augment", "none"),
                   getattr(stream_cfg, "interpolation", None), getattr(stream_cfg, "crop_ratio", None))

    # --- resolved settings -------------------------------------------------------------------------------------------
    @property
    def random(self) -> bool:
        """Whether the train view is random (False: the train view equals the eval view)."""
        return self.augment != "none"

    @property
    def train_interpolation(self) -> Interpolation:
        return self.interpolation or _PRESETS[self.transform][0]

    @property
    def eval_interpolation(self) -> Interpolation:
        return self.interpolation or _PRESETS[self.transform][1]

    @property
    def scale(self) -> tuple[float, float]:
        """``RandomResizedCrop`` area range of the train view."""
        return _PRESETS[self.transform][2]

    @property
    def ratio(self) -> tuple[float, float]:
        return _RATIO

    @property
    def resize_size(self) -> int | None:
        """Shorter side after the eval resize (``None``: the image is resized to ``(S, S)`` without a crop)."""
        ratio = self.crop_ratio if self.crop_ratio is not None else _PRESETS[self.transform][3]
        return None if ratio is None else max(self.img_size, round(self.img_size / ratio))

    # --- views -------------------------------------------------------------------------------------------------------
    def eval_view(self, img: Tensor) -> Tensor:
        """Deterministic view: ``(..., C, H, W)`` uint8 or float in [0, 1] -> ``(..., C, S, S)`` of the same dtype."""
        from torchvision.transforms.v2 import functional as TF

        s, interp = self.img_size, _mode(self.eval_interpolation)
        size = self.resize_size
        if size is None:
            out = img if tuple(img.shape[-2:]) == (s, s) else TF.resize(img, [s, s], interp, antialias=True)
        else:
            out = TF.center_crop(TF.resize(img, [size], interp, antialias=True), [s, s])
        return _clamp_float(out)

    def train_view(self, img: Tensor, generator: torch.Generator) -> Tensor:
        """Train view of one image ``(C, H, W)``; random draws come from ``generator`` only (see module docstring)."""
        from torchvision.transforms.v2 import functional as TF

        if self.augment == "none":
            return self.eval_view(img)
        if self.augment == "flip":
            out = self.eval_view(img)
        else:
            top, left, h, w = self.crop_box(img.shape[-2], img.shape[-1], generator)
            out = _clamp_float(TF.resized_crop(img, top, left, h, w, [self.img_size, self.img_size],
                                               _mode(self.train_interpolation), antialias=True))
        if not bool(torch.rand(1, generator=generator) >= 0.5):  # RandomHorizontalFlip(p=0.5)'s draw
            out = TF.horizontal_flip(out)
        return out

    def crop_box(self, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` drawn as ``torchvision.transforms.v2.RandomResizedCrop.make_params`` does (same draws,
        same order, same centre-crop fallback after 10 failed tries), from ``generator``."""
        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio))
        lo, hi = self.scale
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(lo, hi, generator=generator).item()
            aspect = torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]),
                                                       generator=generator)).item()
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
                left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
                return top, left, h, w
        in_ratio = float(width) / float(height)
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def torchvision_pipeline(self, kind: Literal["train", "eval"]) -> Callable[[Tensor], Tensor]:
        """The same view as torchvision ``v2.Compose`` (global RNG): the reference the parity tests compare with."""
        from torchvision.transforms import v2

        s = self.img_size
        size = self.resize_size
        ev: list[Any] = ([v2.Resize([s, s], _mode(self.eval_interpolation), antialias=True)] if size is None else
                         [v2.Resize(size, _mode(self.eval_interpolation), antialias=True), v2.CenterCrop(s)])
        if kind == "eval" or self.augment == "none":
            return v2.Compose(ev)
        if self.augment == "flip":
            return v2.Compose([*ev, v2.RandomHorizontalFlip(0.5)])
        return v2.Compose([v2.RandomResizedCrop(s, self.scale, self.ratio, _mode(self.train_interpolation),
                                                antialias=True), v2.RandomHorizontalFlip(0.5)])


def _mode(name: str) -> Any:
    from torchvision.transforms import InterpolationMode

    return InterpolationMode.BICUBIC if name == "bicubic" else InterpolationMode.BILINEAR


def _clamp_float(x: Tensor) -> Tensor:
    return x.clamp(0.0, 1.0) if x.is_floating_point() else x


# ----------------------------------------------------------------------------------------------------------------------
# decoding

# modes Pillow opens that convert("RGB") handles correctly (CMYK naively, as torchvision's pil_loader does)
_RGB_CONVERTIBLE = frozenset({"1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "LA",
                              "PA", "La"})
_HIGH_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
SUPPORTED_MODES = _RGB_CONVERTIBLE | _HIGH_BIT


def to_chw_image(x: Any) -> Tensor:
    """PIL image, numpy array ``(H, W[, C])`` or tensor ``([C,] H, W)`` -> 3-channel tensor ``(3, H, W)``.

    uint8 stays uint8; floats stay floats (expected in [0, 1]); PIL images go through :func:`pil_to_tensor`.
    1 channel is repeated, a 4th (alpha) channel dropped.
    """
    from PIL import Image

    if isinstance(x, Image.Image):
        return pil_to_tensor(x)
    if not isinstance(x, Tensor):
        arr = np.asarray(x)
        x = torch.from_numpy(np.ascontiguousarray(arr))
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    elif x.ndim == 2:
        x = x.unsqueeze(0)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    elif x.shape[0] in (2, 4):  # grey + alpha, RGB + alpha
        x = x[:1].expand(3, -1, -1) if x.shape[0] == 2 else x[:3]
    return x.contiguous()


def pil_to_tensor(im: Any, name: str = "image") -> Tensor:
    """A Pillow image of any mode -> uint8 ``(3, H, W)``.

    16-bit modes (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``, and ``I`` holding values in 0..65535) become
    ``round(v / 257)``; ``F`` images with values in [0, 1] become ``round(255 v)``; other modes use Pillow's
    ``convert("RGB")``.

    Raises:
        DataError: a mode that cannot be converted correctly (one line naming ``name`` and the mode).
    """
    mode = im.mode
    if mode in _HIGH_BIT:
        arr = np.asarray(im)
        if mode == "F":
            finite = bool(np.isfinite(arr).all())
            if not finite or arr.size and (float(arr.min()) < 0.0 or float(arr.max()) > 1.0):
                rng = f"{float(np.nanmin(arr)):g}..{float(np.nanmax(arr)):g}" if arr.size else "empty"
                raise DataError(f"{name}: image mode F (32-bit float) with values {rng} cannot be converted to RGB; "
                                f"only values in [0, 1] are understood (save it as 8- or 16-bit)")
            grey = np.rint(arr.astype(np.float64) * 255.0)
        else:
            wide = arr.astype(np.int64)
            if mode == "I" and wide.size and (int(wide.min()) < 0 or int(wide.max()) > 65535):
                raise DataError(f"{name}: image mode I (32-bit integer) with values {int(wide.min())}.."
                                f"{int(wide.max())} cannot be converted to RGB; only 16-bit values (0..65535) are "
                                f"understood")
            grey = np.rint(wide / 257.0)
        g = torch.from_numpy(grey.astype(np.uint8))
        return g.unsqueeze(0).expand(3, -1, -1).contiguous()
    if mode not in _RGB_CONVERTIBLE:
        raise DataError(f"{name}: image mode {mode} cannot be converted to RGB; supported modes: "
                        f"{', '.join(sorted(SUPPORTED_MODES))}")
    if mode == "La":  # premultiplied grey + alpha: Pillow converts it only to LA
        im = im.convert("LA")
    rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def _reason(path: Path, err: BaseException) -> str:
    from PIL import UnidentifiedImageError

    try:
        if path.stat().st_size == 0:
            return "empty file"
    except OSError:
        pass
    if isinstance(err, UnidentifiedImageError):
        return "not an image format Pillow can read"
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text


def decode_image(path: str | Path) -> Tensor:
    """Decode an image file to uint8 ``(3, H, W)`` (:func:`pil_to_tensor` rules).

    Raises:
        DataError: ``cannot decode <path> (<reason>)`` for unreadable, truncated or empty files; one line naming the
            file and the mode for modes that cannot be converted.
    """
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return pil_to_tensor(im, str(path))
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot decode {path} ({_reason(path, err)})") from None


def check_image_file(path: str | Path) -> str:
    """Cheap check of one file without decoding its pixels: header, Pillow's ``verify`` (chunk CRCs and truncation
    for PNG) and a supported mode. Returns the mode.

    Raises:
        DataError: ``cannot decode <path> (<reason>)``, or one line naming the file and an unsupported mode.
    """
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            mode = im.mode
            im.verify()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot decode {path} ({_reason(path, err)})") from None
    if mode not in SUPPORTED_MODES:
        raise DataError(f"{path}: image mode {mode} cannot be converted to RGB; supported modes: "
                        f"{', '.join(sorted(SUPPORTED_MODES))}")
    return mode
