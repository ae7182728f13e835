"""Preprocessing (cl/transforms.py): the official pipelines, torchvision parity, seeding, and decoding of every mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cl.errors import DataError
from cl.transforms import Preprocessing, decode_image, mix_seed, pil_to_tensor, set_augmentation_seed, to_chw_image
from streams.dataset import ArraySource, FileSource, ImageCache, ImageDataset

PIPELINES = [(t, a) for t in ("pilot", "lae", "none") for a in ("none", "flip", "crop")]


def _red_border(size: int = 256, border: int = 16) -> torch.Tensor:
    img = torch.zeros(3, size, size, dtype=torch.uint8)
    img[2] = 200  # blue inside
    img[:, :border] = img[:, -border:] = img[:, :, :border] = img[:, :, -border:] = 0
    img[0, :border] = img[0, -border:] = img[0, :, :border] = img[0, :, -border:] = 255  # red frame
    return img


def _red(x: torch.Tensor) -> int:
    r, g, b = x.int()
    return int(((r > 100) & (b < 100) & (g < 100)).sum())


def test_eval_view_crops_the_border_away():
    """Resize the shorter side to 256 and centre-crop 224: a 16-px frame of a 256-px image is cut off entirely."""
    img = _red_border()
    squashed = Preprocessing(224, "none").eval_view(img)  # the old behaviour: the whole image squashed
    assert _red(squashed) > 0
    for transform in ("pilot", "lae"):
        out = Preprocessing(224, transform).eval_view(img)
        assert out.shape == (3, 224, 224) and out.dtype == torch.uint8
        assert _red(out) == 0, transform


def test_method_settings():
    pilot, lae = Preprocessing(224, "pilot", "crop"), Preprocessing(224, "lae", "crop")
    assert (pilot.resize_size, pilot.scale, pilot.eval_interpolation, pilot.train_interpolation) == (
        256, (0.05, 1.0), "bicubic", "bilinear")  # PILOT: RandomResizedCrop keeps torchvision's bilinear default
    assert (lae.resize_size, lae.scale, lae.eval_interpolation, lae.train_interpolation) == (
        256, (0.08, 1.0), "bilinear", "bilinear")
    assert Preprocessing(32).resize_size == 37 and Preprocessing(56).resize_size == 64  # round(S * 256 / 224)
    assert Preprocessing(224, crop_ratio=1.0).resize_size == 224
    assert Preprocessing(224, "pilot", interpolation="bilinear").eval_interpolation == "bilinear"
    assert Preprocessing(224, "none").resize_size is None


@pytest.mark.parametrize(("transform", "augment"), PIPELINES)
@pytest.mark.parametrize("shape", [(3, 45, 70), (1, 28, 28), (3, 300, 20)])  # wide, small grey, too thin to crop
def test_views_equal_torchvision(transform, augment, shape):
    """Our views equal torchvision's own v2 transforms with the same parameters, the train view under
    ``torch.manual_seed(s)`` (same draws, same order; the last shape forces RandomResizedCrop's centre fallback)."""
    gen = torch.Generator().manual_seed(7)
    img = to_chw_image(torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen))
    prep = Preprocessing(32, transform, augment)
    ref_eval, ref_train = prep.torchvision_pipeline("eval"), prep.torchvision_pipeline("train")
    assert torch.equal(prep.eval_view(img), ref_eval(img))
    state = torch.get_rng_state()
    for s in range(12):
        ours = prep.train_view(img, torch.Generator().manual_seed(s))
        torch.manual_seed(s)
        assert torch.equal(ours, ref_train(img)), s
    torch.set_rng_state(state)
    floats = img.float() / 255  # float images in [0, 1] take the same path (clamped after bicubic overshoot)
    ours = prep.train_view(floats, torch.Generator().manual_seed(3))
    torch.manual_seed(3)
    assert torch.allclose(ours, ref_train(floats).clamp(0, 1)) and ours.dtype == torch.float32


def _dataset(prep: Preprocessing, n: int = 6, size: int = 28) -> ImageDataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size + 4, 3), dtype=np.uint8)
    return ImageDataset(ArraySource(images), np.arange(n), np.zeros(n, dtype=np.int64), prep, "train",
                        ImageCache(None), aug_seed=2)


def test_dataset_train_view_is_torchvision_with_its_sample_seed():
    ds = _dataset(Preprocessing(32, "pilot", "crop"))
    ds.set_augmentation_seed(11)
    ref = ds.prep.torchvision_pipeline("train")
    for i in range(len(ds)):
        torch.manual_seed(ds.sample_seed(i))
        assert torch.equal(ds[i][0], ref(ds.raw(i)))
    small = ds.view("eval")[0][0]  # 28 x 32 px upsampled: the shorter side to 37, centre crop 32
    assert small.shape == (3, 32, 32) and torch.equal(small, ds.prep.eval_view(ds.raw(0)))


def test_augmentation_seeded_per_epoch_and_sample_not_global_rng():
    ds = _dataset(Preprocessing(32, "lae", "crop"))
    state = torch.get_rng_state()
    ds.set_augmentation_seed(1)
    a = [ds[i][0] for i in range(len(ds))]
    assert all(torch.equal(x, ds[i][0]) for i, x in enumerate(a)), "same epoch seed: same views"
    assert torch.equal(torch.get_rng_state(), state), "the global RNG is never used"
    ds.set_augmentation_seed(2)
    assert sum(not torch.equal(x, ds[i][0]) for i, x in enumerate(a)) >= len(ds) - 1, "a new epoch, new views"
    view = ds.subset([3, 1])
    assert torch.equal(view[0][0], ds[3][0]), "a sample's view does not depend on its position"


def test_workers_and_walker_give_the_same_batches():
    """The loop's epoch seed reaches datasets inside ConcatDataset / Subset; 0 or 2 workers give the same batches."""
    from torch.utils.data import ConcatDataset, DataLoader, Subset

    a, b = _dataset(Preprocessing(32, "pilot", "crop")), _dataset(Preprocessing(32, "pilot", "flip"))
    data = Subset(ConcatDataset([a, b]), list(range(10)))
    assert set_augmentation_seed(data, 5) == 2 and a.epoch_seed == b.epoch_seed == 5

    def batches(workers: int) -> list[torch.Tensor]:
        loader = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0),
                            num_workers=workers)
        return [x for x, _ in loader]

    for x, y in zip(batches(0), batches(2), strict=True):
        assert torch.equal(x, y)


def test_deterministic_flag_and_cache():
    ds = _dataset(Preprocessing(32, "pilot", "none"))
    assert ds.deterministic and ds.view("eval").deterministic
    assert not _dataset(Preprocessing(32, "pilot", "flip")).deterministic
    assert ds[0][0] is ds[0][0], "deterministic views are cached"
    assert len(ds.cache) == 1 and ds.cache.used_bytes == 3 * 32 * 32
    capped = ImageCache(3 * 32 * 32 * 2)  # room for two eval views
    ds2 = ImageDataset(ds.source, ds.indices, ds.labels.tolist(), ds.prep, "eval", capped)
    views = [ds2[i][0] for i in range(len(ds2))]
    assert len(capped) == 2 and capped.refused == len(ds2) - 2 and capped.used_bytes <= capped.cap_bytes
    assert all(torch.equal(v, ds2[i][0]) for i, v in enumerate(views)), "decoded on demand beyond the cap"


def test_mix_seed_is_stable():
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3) != mix_seed(1, 3, 2)
    assert 0 <= mix_seed(-1, 2**70) < 2**63


# --- decoding --------------------------------------------------------------------------------------------------------

def _save(im: Image.Image, path, fmt: str) -> str:
    im.save(path, format=fmt)
    return str(path)


@pytest.mark.parametrize(("mode", "fmt"), [("I;16", "PNG"), ("I;16B", "TIFF"), ("I;16", "TIFF"), ("I", "TIFF")])
def test_16_bit_images_are_scaled_not_clipped(mode, fmt, tmp_path):
    arr = np.array([[33667, 0], [65535, 257]], dtype=np.uint16)
    im = Image.fromarray(arr).convert(mode) if mode != "I;16" else Image.fromarray(arr)
    if mode == "I;16B":
        im = Image.frombytes("I;16B", (2, 2), arr.astype(">u2").tobytes())
    path = _save(im, tmp_path / f"x.{fmt.lower()}", fmt)
    out = decode_image(path)
    assert out.shape == (3, 2, 2) and out.dtype == torch.uint8
    assert out[:, 0, 0].tolist() == [131, 131, 131]  # 33667 / 257 = 131, not 255 (Pillow's convert clips)
    assert out[0].tolist() == [[131, 0], [255, 1]]


def test_float_images(tmp_path):
    ok = _save(Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)), tmp_path / "f.tif", "TIFF")
    assert decode_image(ok)[0].tolist() == [[0, 128], [255, 64]]
    bad = _save(Image.fromarray(np.array([[0.0, 300.0]], dtype=np.float32)), tmp_path / "g.tif", "TIFF")
    with pytest.raises(DataError, match=r"g\.tif: image mode F .*0\.\.300"):
        decode_image(bad)
    wide = _save(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)), tmp_path / "i.tif", "TIFF")
    with pytest.raises(DataError, match=r"i\.tif: image mode I "):
        decode_image(wide)


def test_every_pillow_mode_converts_or_names_file_and_mode():
    modes = sorted(getattr(Image, "MODES", [])) or ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I",
                                                      "F", "LA", "PA", "RGBX", "RGBa", "La", "I;16", "I;16B"]
    for mode in modes:
        im = Image.new(mode, (3, 2))
        try:
            out = pil_to_tensor(im, f"file-{mode}")
        except DataError as err:
            assert f"file-{mode}" in str(err) and mode in str(err) and "\n" not in str(err)
            continue
        assert out.shape == (3, 2, 3) and out.dtype == torch.uint8, mode
    rgb = Image.new("RGB", (1, 1), (10, 20, 30))
    for im in [rgb.convert(m) for m in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV")] + [
            rgb.convert("P", palette=Image.Palette.ADAPTIVE)]:
        assert pil_to_tensor(im).flatten().tolist() == pytest.approx([10, 20, 30], abs=3), im.mode
    assert pil_to_tensor(Image.new("La", (1, 1), (50, 255))).flatten().tolist() == [50, 50, 50]


def test_unknown_mode_stops_with_one_line():
    class Weird:
        mode = "BGR;15"

    with pytest.raises(DataError, match="weird.png: image mode BGR;15 cannot be converted to RGB"):
        pil_to_tensor(Weird(), "weird.png")


def test_file_source_decodes_through_the_same_rules(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.full((4, 5), 33667, dtype=np.uint16)).save(path)
    src = FileSource([path])
    src.check([0])
    assert torch.equal(src.load(0), to_chw_image(torch.full((4, 5), 131, dtype=torch.uint8)))


def test_augmented_run_is_the_same_with_workers_and_after_resume(smoke_config, tmp_path, interrupt_run):
    """RandomResizedCrop + flip in the loop: 0 or 2 DataLoader workers and an interrupted-then-resumed run all give
    the full run's result (augmentation is seeded per run, task, phase, epoch and sample)."""
    from cl import loop

    base = ["strategy.name=finetune", "stream.augment=crop", "train.epochs=1", "stream.train_images_per_class=4",
            "stream.test_images_per_class=2", "train.checkpoint=true"]
    no_figures = {"figures": lambda r, d: []}
    full = loop.run(smoke_config(*base, f"out={tmp_path}/full"), **no_figures)
    workers = loop.run(smoke_config(*base, "train.num_workers=2", f"out={tmp_path}/workers"), **no_figures)
    assert workers["accuracy_matrix"] == full["accuracy_matrix"]

    cfg = smoke_config(*base, f"out={tmp_path}/cut")
    interrupt_run(cfg, 1, **no_figures)
    resumed = loop.run(cfg, resume=True, **no_figures)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
