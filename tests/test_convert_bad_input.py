"""Nothing lost: a tree mixing real images with every kind of bad input converts the
good images exactly and lists every other file in skipped.jsonl with its reason."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import PROJECT, RESNET20, stored_samples
from PIL import Image

from cli import main
from rela_convert.dataset.index import DatasetIndex
from rela_convert.images import MAX_PIXELS, prior_pixels
from rela_convert.priors import load_prior

PRIOR = f"cifar-resnet:20:{RESNET20}"


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width x height`` pixels (a decompression bomb's header)."""
    png = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    png[16:24] = struct.pack(">II", width, height)  # IHDR data starts at byte 16
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def build_tree(src: Path, cifar_root: Path) -> tuple[dict[bytes, bytes], dict[str, str]]:
    """Write the mixed tree. Returns the files expected in the output (raw relative
    path -> bytes) and the entries expected in skipped.jsonl (path -> start of the reason)."""
    cats = sorted((cifar_root / "test" / "cat").iterdir())
    dogs = sorted((cifar_root / "test" / "dog").iterdir())
    real = Image.open(dogs[5]).convert("RGB")
    palette = real.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    exif = Image.Exif()
    exif[0x0112] = 6
    good = {
        **{f"cat/{path.name}".encode(): path.read_bytes() for path in cats[:4]},
        **{f"dog/{path.name}".encode(): path.read_bytes() for path in dogs[:4]},  # same basenames as cat/
        b"cat/caf\xe9.jpg": cats[4].read_bytes(),  # not UTF-8
        "dog/with space & ünï #1.jpg".encode(): dogs[4].read_bytes(),
        b"dog/png-named.jpg": encode(real, "PNG"),
        b"dog/cmyk.jpg": encode(real.convert("CMYK"), "JPEG", quality=90),
        b"dog/sixteen-bit.png": encode(Image.fromarray(np.asarray(real.convert("L")).astype(np.uint16) * 257), "PNG"),
        b"dog/palette-transparent.png": encode(palette, "PNG", transparency=0),
        b"dog/rotated.jpg": encode(real.crop((0, 0, 32, 20)), "JPEG", quality=95, exif=exif),
        b"dog/tiny.png": encode(real.resize((6, 5)), "PNG"),
        b"flat.jpg": cats[5].read_bytes(),
    }
    for relpath, data in good.items():
        path = os.path.join(os.fsencode(src), relpath)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)
    os.symlink("../dog/0000.jpg", src / "cat" / "link.jpg")  # a file link converts like a file
    good[b"cat/link.jpg"] = good[b"dog/0000.jpg"]

    jpeg = cats[6].read_bytes()
    bad = {
        "cat/truncated.jpg": (jpeg[: 2 * len(jpeg) // 3], "truncated"),
        "cat/empty.jpg": (b"", "empty file (0 bytes)"),
        "cat/text.png": (b"just some text\n" * 20, "not a readable image"),
        "cat/animation.gif": (encode(real, "GIF"), "not an image file extension"),
        "cat/tiff-inside.jpg": (encode(real, "TIFF"), "unsupported image format TIFF"),
        "cat/bomb.png": (png_claiming_size(20_000, 20_000), "decompression bomb refused"),
        "cat/locked.jpg": (cats[7].read_bytes(), "unreadable file: Permission denied"),
        "dog/.DS_Store": (b"\0\0\0\1Bud1", "hidden file"),
    }
    for relpath, (data, _) in bad.items():
        (src / relpath).write_bytes(data)
    (src / "cat" / "locked.jpg").chmod(0)
    with open(os.path.join(os.fsencode(src), b"cat/notes\xff.txt"), "wb") as handle:
        handle.write(b"not an image")
    os.mkfifo(src / "dog" / "pipe.jpg")
    os.symlink("missing.jpg", src / "dog" / "broken.jpg")
    os.symlink("..", src / "dog" / "loop")
    os.symlink("cat", src / "alias")  # sorted before cat/: real folders are walked first
    skipped = {relpath: reason for relpath, (_, reason) in bad.items()}
    skipped.update(
        {
            "cat/notes\\xff.txt": "not an image file extension",
            "dog/pipe.jpg": "not a regular file",
            "dog/broken.jpg": "broken symbolic link",
            "dog/loop": "directory already walked",
            "alias": "directory already walked",
        }
    )
    return good, skipped


def every_entry(src: Path) -> set[str]:
    """Every file and every link to a folder under ``src`` (links not followed), as displayed paths."""
    entries = set()
    for folder, folders, files in os.walk(os.fsencode(src)):
        for name in files + [name for name in folders if os.path.islink(os.path.join(folder, name))]:
            entries.add(
                os.path.relpath(os.path.join(folder, name), os.fsencode(src)).decode("utf-8", "backslashreplace")
            )
    return entries


def unprivileged(command: list[str]) -> tuple[list[str], str | None]:
    """Run as an unprivileged user when the tests run as root, so that a chmod 000 file is
    really unreadable. Returns the command and, when that is impossible, the reason."""
    if os.geteuid() != 0:
        return command, None
    if shutil.which("setpriv"):
        return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command], None
    return command, "tests run as root and setpriv is missing: root reads chmod 000 files"


@pytest.fixture
def open_tmp():
    """A temporary folder that an unprivileged user may enter and write."""
    path = Path(tempfile.mkdtemp(prefix="rela-bad-input-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


def test_every_bad_input_is_skipped_with_its_reason(cifar_root, open_tmp):
    src, out = open_tmp / "src", open_tmp / "out"
    good, skipped = build_tree(src, cifar_root)
    command, no_lock = unprivileged(
        [
            sys.executable,
            "-m",
            "cli",
            "convert",
            str(src),
            str(out),
            "--prior",
            PRIOR,
            "--format",
            "both",
            "--shard-size",
            "8",
            "--batch-size",
            "4",
            "--workers",
            "1",
            "--quiet",
        ]
    )
    if no_lock:
        warnings.warn(f"not checked that an unreadable file is skipped: {no_lock}")
        good[b"cat/locked.jpg"] = (src / "cat" / "locked.jpg").read_bytes()
        del skipped["cat/locked.jpg"]
    result = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{len(good)} converted, {len(skipped)} skipped" in result.stdout

    recorded = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    reasons = {entry["path"]: entry["reason"] for entry in recorded}
    assert len(reasons) == len(recorded)
    assert set(reasons) == set(skipped)
    for path, reason in skipped.items():
        assert reason.lower() in reasons[path].lower(), (path, reasons[path])

    index = DatasetIndex.load(out)
    assert (index.num_samples, index.num_skipped, index.classes) == (len(good), len(skipped), ["cat", "dog"])
    samples = stored_samples(out, "webdataset")
    for sample, same in zip(samples, stored_samples(out, "hdf5"), strict=True):
        assert {**sample, "feature": None} == {**same, "feature": None} and np.array_equal(
            sample["feature"], same["feature"]
        )
    by_path = {sample["relpath"]: sample for sample in samples}
    assert set(by_path) == set(good)
    converted_paths = {path.decode("utf-8", "backslashreplace") for path in by_path}
    assert every_entry(src) == converted_paths | set(reasons)  # nothing lost
    for relpath, data in good.items():
        sample = by_path[relpath]
        assert sample["image"] == data  # the original bytes
        assert sample["label"] == {b"cat": 0, b"dog": 1}.get(relpath.split(b"/")[0], -1)
        assert sample["feature"].shape == (64,) and np.isfinite(sample["feature"]).all()
    assert by_path[b"dog/png-named.jpg"]["ext"] == "png" and by_path[b"dog/rotated.jpg"]["ext"] == "jpg"

    # The orientation was applied: the feature is the upright picture's, not the stored one's.
    prior = load_prior(PRIOR)
    stored = Image.open(io.BytesIO(good[b"dog/rotated.jpg"])).convert("RGB")
    upright = prior.features(prior_pixels(encode(stored.transpose(Image.Transpose.ROTATE_270), "PNG"), 32)[None])[0]
    sideways = prior.features(prior_pixels(encode(stored, "PNG"), 32)[None])[0]
    feature = torch.from_numpy(by_path[b"dog/rotated.jpg"]["feature"])
    assert torch.allclose(feature, upright, rtol=1e-5, atol=1e-5) and not torch.allclose(feature, sideways, atol=1e-2)


def test_bomb_limit_holds_even_when_pillow_lifts_its_own(monkeypatch):
    from rela_convert.images import ImageDecodeError, open_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    side = int(MAX_PIXELS**0.5) + 1
    with pytest.raises(
        ImageDecodeError, match=f"decompression bomb refused: {side}x{side} px is above the limit of {MAX_PIXELS} px"
    ):
        open_image(png_claiming_size(side, side))
    assert open_image(png_claiming_size(side - 2, side - 2)).size == (side - 2, side - 2)


def run_cli(*args: str):
    return CliRunner().invoke(main, ["convert", *map(str, args), "--prior", PRIOR, "--workers", "0", "--quiet"])


def test_exit_status_when_nothing_could_be_converted(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "empty.jpg").write_bytes(b"")
    (tmp_path / "bad" / "text.png").write_text("hello")
    result = run_cli(tmp_path / "bad", tmp_path / "out")
    assert result.exit_code == 1 and "none of the 2 image files could be converted" in result.output
    assert len((tmp_path / "out" / "skipped.jsonl").read_text().splitlines()) == 2
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "notes.txt").write_text("hello")
    result = run_cli(tmp_path / "none", tmp_path / "out2")
    assert result.exit_code == 1 and "no image files under" in result.output


def test_exit_status_when_the_output_cannot_be_written(cifar_root, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(sorted((cifar_root / "test" / "cat").iterdir())[0], src / "cat.jpg")
    (tmp_path / "file").write_text("a file, not a folder")
    result = run_cli(src, tmp_path / "file" / "out")
    assert result.exit_code == 1 and result.output.startswith("error: cannot write the output")
    result = run_cli(src, src / "out")
    assert result.exit_code == 1 and "is inside SRC" in result.output
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("precious")
    result = run_cli(src, tmp_path / "busy")
    assert result.exit_code == 1 and "is not empty and holds no rela conversion" in result.output
