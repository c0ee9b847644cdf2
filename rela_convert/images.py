"""Decoding encoded image bytes into RGB pictures, shared by conversion and training.

One rule set for every consumer, so the prior and the target network see the
same pixels: EXIF orientation is applied, greyscale / palette / alpha / CMYK /
16-bit images become 8-bit RGB (the alpha channel is dropped, as Pillow's
``convert("RGB")`` and torchvision's ``ImageFolder`` loader do; 16-bit samples
keep their 8 most significant bits), and pictures above :data:`MAX_PIXELS`
are refused before any pixel is decoded.
"""

from __future__ import annotations

import io
import warnings

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

#: File extensions read as images (lower case). Everything else is skipped with a reason.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

#: Pictures with more pixels than this are refused as decompression bombs, before any
#: pixel is decoded: Pillow's own hard limit (twice its default ``MAX_IMAGE_PIXELS``;
#: about 13,377 x 13,377 px, 512 MiB as RGB), enforced here too so that it holds even
#: when other code lifts Pillow's. ImageNet-1K images are far smaller.
MAX_PIXELS = 178_956_970

#: Container formats whose encoded bytes are stored unchanged in shards.
STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}


class ImageDecodeError(ValueError):
    """Raised when bytes cannot be turned into an RGB picture; the message is the skip reason."""


def open_image(data: bytes) -> Image.Image:
    """Open encoded bytes without decoding the pixels yet.

    Args:
        data: the encoded file content.

    Returns:
        A lazily decoded ``PIL.Image.Image``; ``draft`` may still be applied to it.

    Raises:
        ImageDecodeError: empty input, an unknown format, a format outside
            :data:`STORED_FORMATS`, or more than :data:`MAX_PIXELS` pixels.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow warns from half of MAX_PIXELS on and raises above it; the limit is checked below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"decompression bomb refused: {error}") from None
    except UnidentifiedImageError:  # its message holds a memory address: keep reasons reproducible
        raise ImageDecodeError("not a readable image: unknown format or damaged header") from None
    except Exception as error:  # Pillow raises many types for garbage input
        raise ImageDecodeError(f"not a readable image: {error}") from None
    if image.format not in STORED_FORMATS:
        raise ImageDecodeError(f"unsupported image format {image.format}")
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageDecodeError(f"decompression bomb refused: {width}x{height} px is above the limit of {MAX_PIXELS} px")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Decode an opened picture into an 8-bit RGB image, EXIF orientation applied.

    Args:
        image: a picture from :func:`open_image` (draft mode may have been set).

    Returns:
        ``PIL.Image.Image`` in mode ``"RGB"``, shape (height, width, 3), uint8.

    Raises:
        ImageDecodeError: truncated or corrupt pixel data.
    """
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit greyscale: keep the 8 most significant bits.
            image = image.point(lambda value: value / 256).convert("L")
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        return image.convert("RGB")
    except Exception as error:
        raise ImageDecodeError(f"corrupt or truncated image data: {error}") from None


def decode_rgb(data: bytes) -> Image.Image:
    """Decode encoded bytes into an RGB picture at full resolution.

    Args:
        data: the encoded file content.

    Returns:
        ``PIL.Image.Image`` in mode ``"RGB"`` (uint8).

    Raises:
        ImageDecodeError: see :func:`open_image` and :func:`to_rgb`.
    """
    return to_rgb(open_image(data))


def prior_pixels(data: bytes, size: int) -> torch.Tensor:
    """:func:`prior_view` of encoded bytes (opened with :func:`open_image`).

    Returns:
        uint8 tensor ``[3, S, S]``.

    Raises:
        ImageDecodeError: see :func:`open_image` and :func:`to_rgb`.
    """
    return prior_view(open_image(data), size)


def prior_view(image: Image.Image, size: int) -> torch.Tensor:
    """The prior's view of an image (method.md, stage 1, step 1): torchvision's
    ``Resize(size)`` (shorter side to ``size``, bilinear, antialiased; small images
    are upscaled) then ``CenterCrop(size)``, applied to the PIL picture. JPEGs are
    decoded at the smallest DCT scale that still covers ``size x size`` (Pillow
    draft mode), which is much cheaper for large images and changes pixels only
    below the prior's resolution.

    Args:
        image: a picture from :func:`open_image`, not decoded yet (draft mode is set on it).
        size: the prior's input size S, pixels.

    Returns:
        uint8 tensor ``[3, S, S]``.

    Raises:
        ImageDecodeError: see :func:`to_rgb`.
    """
    from torchvision.transforms.v2 import functional

    if image.format == "JPEG":
        image.draft("RGB", (size, size))
    image = functional.center_crop(functional.resize(to_rgb(image), size), size)
    return functional.pil_to_tensor(image)


def device_decodable(image: Image.Image) -> bool:
    """Whether :func:`device_pixels` takes this opened picture: a JPEG in YCbCr/RGB or
    greyscale (nvJPEG and torchvision's CPU decoder do not take CMYK or YCCK JPEGs)."""
    return image.format == "JPEG" and image.mode in ("RGB", "L")


def _decode_jpeg_or_reason(encoded: torch.Tensor, device: torch.device) -> torch.Tensor | str:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except RuntimeError as error:  # "decode_jpeg, <source file>:<line>, <what libjpeg said>"
        return f"corrupt or truncated image data: {str(error).rsplit(', ', 1)[-1]}"


def device_pixels(
    encoded: list[bytes], size: int, device: torch.device
) -> tuple[torch.Tensor | None, list[str | None]]:
    """The prior's view of a batch of JPEGs, decoded and resized on ``device``: one batched
    ``torchvision.io.decode_jpeg`` call (nvJPEG on CUDA, libjpeg-turbo on the CPU), EXIF
    orientation applied, then the same ``Resize(size)`` (bilinear, antialiased) and
    ``CenterCrop(size)`` as :func:`prior_pixels`, on tensors. Pixels differ from
    :func:`prior_pixels` by at most a grey level (ImageNet sample at 224 px; CIFAR-10:
    identical), except for JPEGs at least twice the prior's size, which the Pillow path
    decodes at reduced DCT scale and this one at full scale (mean difference ~3 levels).

    Args:
        encoded: JPEG file contents, each accepted by :func:`device_decodable`.
        size: the prior's input size S, pixels.
        device: where to decode.

    Returns:
        ``(pixels, reasons)``: uint8 ``[n_ok, 3, S, S]`` on ``device`` for the inputs that
        decoded, in input order (None when none did), and per input None or the reason it
        could not be decoded (one bad file fails a batched call, so the batch is then
        decoded file by file).
    """
    from torchvision.transforms.v2 import functional

    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in encoded]
    decoded = _decode_jpeg_or_reason(tensors, device)
    if isinstance(decoded, str):
        decoded = [_decode_jpeg_or_reason(tensor, device) for tensor in tensors]
    views = [
        functional.center_crop(functional.resize(image, size, antialias=True), size)
        for image in decoded
        if not isinstance(image, str)
    ]
    return (torch.stack(views) if views else None), [image if isinstance(image, str) else None for image in decoded]
