"""The tree reader: listing order, keys and labels of flat and nested trees, what is
skipped and why, and decoding of every image mode into the prior's RGB view."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from rela_convert.images import IMAGE_EXTENSIONS, STORED_FORMATS, decode_rgb, open_image, prior_pixels
from rela_convert.tree import scan_tree


@pytest.fixture(scope="module")
def cifar_images(cifar_root) -> list[Path]:
    """Two real CIFAR-10 test images of each of the first three classes."""
    return [image for folder in sorted((cifar_root / "test").iterdir())[:3] for image in sorted(folder.iterdir())[:2]]


def test_nested_tree_labels_come_from_the_first_folder_level(tmp_path, cifar_images):
    layout = ["dog/b.jpg", "cat/z.jpg", "cat/deeper/a.jpg", "cat/a.jpg", "bird/x/y/c.jpg", "top.jpg"]
    for relpath, source in zip(layout, cifar_images):
        (tmp_path / relpath).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, tmp_path / relpath)
    listing = scan_tree(tmp_path)
    assert listing.classes == ["bird", "cat", "dog"]
    assert [(file.key, file.relpath, file.label) for file in listing.files] == [
        (0, b"bird/x/y/c.jpg", 0),
        (1, b"cat/a.jpg", 1),
        (2, b"cat/deeper/a.jpg", 1),
        (3, b"cat/z.jpg", 1),
        (4, b"dog/b.jpg", 2),
        (5, b"top.jpg", None),
    ]
    assert all(
        Path(file.path).read_bytes() == (tmp_path / file.relpath.decode()).read_bytes() for file in listing.files
    )
    assert listing.skipped == []
    assert scan_tree(tmp_path) == listing  # deterministic


def test_flat_tree_has_no_labels(tmp_path, cifar_images):
    for index, source in enumerate(reversed(cifar_images)):
        shutil.copyfile(source, tmp_path / f"img{index}.JPG")
    listing = scan_tree(tmp_path)
    assert listing.classes == []
    assert [file.relpath for file in listing.files] == [
        f"img{index}.JPG".encode() for index in range(len(cifar_images))
    ]
    assert all(file.label is None for file in listing.files)


def test_everything_not_listed_is_skipped_with_a_reason(tmp_path, cifar_images):
    (tmp_path / "cat").mkdir()
    shutil.copyfile(cifar_images[0], tmp_path / "cat" / "1.jpg")
    (tmp_path / "cat" / "notes.txt").write_text("hello")
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / ".thumbs").mkdir()
    shutil.copyfile(cifar_images[1], tmp_path / ".thumbs" / "1.jpg")
    os.mkfifo(tmp_path / "cat" / "pipe.jpg")
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "cat" / "broken.jpg")
    os.symlink(tmp_path / "cat" / "1.jpg", tmp_path / "cat" / "2.jpg")  # a file link is read as a file
    os.symlink(tmp_path, tmp_path / "cat" / "loop")  # a loop
    os.symlink(tmp_path / "cat", tmp_path / "alias")  # a second way into cat/, sorted before it
    listing = scan_tree(tmp_path)
    assert [file.relpath for file in listing.files] == [b"cat/1.jpg", b"cat/2.jpg"]
    assert listing.classes == ["cat"]
    reasons = {entry["path"]: entry["reason"] for entry in listing.skipped}
    assert set(reasons) == {
        ".thumbs/1.jpg",
        "cat/.DS_Store",
        "cat/notes.txt",
        "cat/pipe.jpg",
        "cat/broken.jpg",
        "cat/loop",
        "alias",
    }
    assert reasons[".thumbs/1.jpg"].startswith("hidden file")
    assert reasons["cat/notes.txt"].startswith("not an image file extension")
    assert reasons["cat/pipe.jpg"] == "not a regular file"
    assert reasons["cat/broken.jpg"].startswith("broken symbolic link")
    assert reasons["cat/loop"].startswith("directory already walked") and reasons["alias"].startswith(
        "directory already walked"
    )


def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        scan_tree(tmp_path / "missing")


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def test_every_image_mode_becomes_rgb(cifar_images):
    original = Image.open(cifar_images[0]).convert("RGB")
    rgb = np.asarray(original).astype(int)
    grey = original.convert("L")
    palette = original.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    alpha = original.copy()
    alpha.putalpha(Image.linear_gradient("L").resize(original.size))
    sixteen_bit = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)
    cases = {
        "grey PNG": (encode(grey, "PNG"), np.repeat(np.asarray(grey)[..., None], 3, 2)),
        "grey+alpha PNG": (encode(grey.convert("LA"), "PNG"), np.repeat(np.asarray(grey)[..., None], 3, 2)),
        "palette PNG": (encode(palette, "PNG"), np.asarray(palette.convert("RGB"))),
        "palette PNG with transparency": (encode(palette, "PNG", transparency=0), np.asarray(palette.convert("RGB"))),
        "RGBA PNG (alpha dropped)": (encode(alpha, "PNG"), rgb),
        "RGBA WebP lossless": (encode(alpha, "WEBP", lossless=True), rgb),
        "16-bit grey PNG (8 high bits)": (encode(sixteen_bit, "PNG"), np.repeat(np.asarray(grey)[..., None], 3, 2)),
        "BMP": (encode(original, "BMP"), rgb),
        "CMYK JPEG": (encode(original.convert("CMYK"), "JPEG", quality=95), None),
    }
    for name, (data, expected) in cases.items():
        decoded = decode_rgb(data)
        assert decoded.mode == "RGB" and decoded.size == original.size, name
        if expected is not None:
            assert np.array_equal(np.asarray(decoded), expected), name
        pixels = prior_pixels(data, 32)
        assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.uint8, name
    # CMYK goes through lossy JPEG: close to the original, not equal.
    assert np.abs(np.asarray(decode_rgb(cases["CMYK JPEG"][0])).astype(int) - rgb).mean() < 8
    assert open_image(cases["palette PNG"][0]).format == "PNG" and STORED_FORMATS["WEBP"] == "webp"


def test_exif_orientation_is_applied(cifar_images):
    upright = Image.open(cifar_images[0]).convert("RGB").crop((0, 0, 32, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display by rotating 90 degrees clockwise
    data = encode(upright, "PNG", exif=exif)
    stored = Image.open(io.BytesIO(data))
    assert stored.size == (32, 20)
    decoded = decode_rgb(data)
    assert decoded.size == (20, 32)
    assert np.array_equal(np.asarray(decoded), np.asarray(stored.convert("RGB").transpose(Image.Transpose.ROTATE_270)))


def test_prior_view_is_a_shorter_side_resize_and_centre_crop(imagenet_sample, cifar_images):
    for path in sorted(imagenet_sample.iterdir())[:5]:
        data = path.read_bytes()
        full = decode_rgb(data)
        assert min(full.size) > 224
        reference = v2.Compose([v2.Resize(224), v2.CenterCrop(224), v2.PILToTensor()])(full)
        pixels = prior_pixels(data, 224)
        assert pixels.shape == reference.shape == (3, 224, 224)
        if min(full.size) < 2 * 224:  # no reduced-scale JPEG decoding: exactly torchvision's transform
            assert torch.equal(pixels, reference)
        else:  # decoding at a reduced DCT scale changes pixels only slightly
            assert (pixels.float() - reference.float()).abs().mean() < 4
    big = decode_rgb(sorted(imagenet_sample.iterdir())[0].read_bytes()).resize((1200, 900))
    big_jpeg = encode(big, "JPEG", quality=95)
    reference = v2.Compose([v2.Resize(224), v2.CenterCrop(224), v2.PILToTensor()])(decode_rgb(big_jpeg))
    assert 0 < (prior_pixels(big_jpeg, 224).float() - reference.float()).abs().mean() < 4
    # Too small for the prior: upscaled, not refused.
    small = encode(Image.open(cifar_images[0]).convert("RGB").resize((12, 9)), "PNG")
    upscaled = prior_pixels(small, 32)
    assert upscaled.shape == (3, 32, 32) and upscaled.float().std() > 0


def test_image_extensions_are_the_stored_formats():
    assert set(IMAGE_EXTENSIONS) == {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
