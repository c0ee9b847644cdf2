"""``--decode device``: JPEGs decoded in batches by torchvision's decoder on the conversion
device (here the CPU: the same code path that uses nvJPEG on a GPU) give the same samples,
skips and nearly the same features as the default Pillow path; other files fall back to it."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import stored_samples
from PIL import Image

from rela_convert.config import ConvertOptions
from rela_convert.convert import ConversionError, convert
from rela_convert.dataset.index import DatasetIndex
from rela_convert.images import device_pixels, prior_pixels

PRIOR = "rand:mobilenet_v3_small@224"


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mixed_tree(imagenet_sample, tmp_path_factory):
    """12 real ImageNet JPEGs, one rotated by EXIF, one CMYK JPEG, one PNG and one truncated JPEG."""
    root = tmp_path_factory.mktemp("device-decode") / "src"
    root.mkdir()
    sources = sorted(imagenet_sample.iterdir())
    for source in sources[:12]:
        shutil.copyfile(source, root / source.name)
    picture = Image.open(sources[12]).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    (root / "rotated.jpg").write_bytes(encode(picture, "JPEG", quality=90, exif=exif))
    (root / "cmyk.jpg").write_bytes(encode(picture.convert("CMYK"), "JPEG", quality=90))
    (root / "picture.png").write_bytes(encode(picture, "PNG"))
    (root / "truncated.jpg").write_bytes(sources[13].read_bytes()[:5000])
    return root


def test_device_pixels_match_the_pillow_view(imagenet_sample):
    data = [path.read_bytes() for path in sorted(imagenet_sample.iterdir())[:15]]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display: both decoders must apply it
    data.append(encode(Image.open(io.BytesIO(data[0])), "JPEG", quality=90, exif=exif))
    pixels, reasons = device_pixels(data + [data[0][:3000]], 224, torch.device("cpu"))
    assert reasons[:16] == [None] * 16 and reasons[16].startswith("corrupt or truncated image data")
    reference = torch.stack([prior_pixels(item, 224) for item in data])
    assert pixels.shape == reference.shape == (16, 3, 224, 224) and pixels.dtype == torch.uint8
    for encoded, ours, theirs in zip(data, pixels, reference):
        difference = (ours.int() - theirs.int()).abs()
        if min(Image.open(io.BytesIO(encoded)).size) < 2 * 224:  # decoded at full scale by both
            assert difference.max() <= 2 and difference.float().mean() < 0.05
        else:  # Pillow decodes at reduced DCT scale (draft mode), the device at full scale
            assert difference.float().mean() < 5


def test_device_decoding_converts_the_same_samples(mixed_tree, tmp_path):
    results, sizes = {}, {}
    for decode in ("cpu", "device"):
        out = tmp_path / decode
        convert(
            mixed_tree, out, PRIOR, ConvertOptions(shard_size=8, batch_size=6, workers=1, progress=False, decode=decode)
        )
        index = DatasetIndex.load(out)
        assert index.job["decode"] == decode and index.storage == "webdataset"
        sizes[decode] = index.image_sizes
        samples = stored_samples(out)
        skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
        results[decode] = (samples, skipped)
    (cpu, cpu_skipped), (device, device_skipped) = results["cpu"], results["device"]
    assert [entry["path"] for entry in cpu_skipped] == [entry["path"] for entry in device_skipped] == ["truncated.jpg"]
    assert device_skipped[0]["reason"].startswith("corrupt or truncated image data")
    assert [sample["relpath"] for sample in cpu] == [sample["relpath"] for sample in device] and len(cpu) == 15
    assert sizes["cpu"] == sizes["device"]  # both read each image's size when they open it
    for ours, theirs in zip(cpu, device):
        assert ours["image"] == theirs["image"] and ours["ext"] == theirs["ext"]
        cosine = np.dot(ours["feature"], theirs["feature"]) / (
            np.linalg.norm(ours["feature"]) * np.linalg.norm(theirs["feature"])
        )
        assert cosine > 0.999, ours["relpath"]  # the EXIF rotation is applied by both decoders
    with pytest.raises(ConversionError, match="decode"):
        convert(
            mixed_tree,
            tmp_path / "cpu",
            PRIOR,
            ConvertOptions(shard_size=8, batch_size=6, workers=1, progress=False, decode="device"),
        )
