"""Training views made on the training device, whole batches at a time (``rela train --augment device``).

The work is split in two:

- DataLoader workers only decode (:func:`decode_for_device`): each image to 8-bit RGB, EXIF orientation
  applied, shrunk (never enlarged) so that its longer side is at most the decode size
  (:func:`decode_size`: :data:`DECODE_FACTOR` x the training size S), aspect ratio kept. JPEGs larger than
  that are decoded at a reduced DCT scale (Pillow draft mode), then resized with Pillow's antialiased
  bilinear filter. A batch is stacked by :func:`stack_decoded` at its largest height and width: each picture
  at the top-left, its last row and column repeated into the rest. The workers yield that uint8 batch and
  each picture's sizes (source and decoded), not views.
- The training process makes both views of every image on its device (:class:`DeviceViews`), with
  per-image random parameters: drawn by :meth:`DeviceView.sample` on a CPU ``torch.Generator`` seeded by
  (seed, epoch, step, rank) (:func:`step_seed`), so a run resumed at any step makes the same views, and
  the parameters do not depend on the device; applied by :meth:`DeviceView.apply` with
  ``torchvision.ops.roi_align`` (crop and resize of every image in one call, each output pixel the mean of
  ``ceil(box / S)^2`` bilinear samples: antialiased when shrinking), ``kornia.enhance`` (colour jitter with
  Pillow's conventions, as torchvision applies it to PIL images), ``kornia.color`` (greyscale),
  ``kornia.filters.gaussian_blur2d`` (blur, one sigma per image) and tensor operations (flip, solarisation,
  normalisation).

Both views are declared by the same :class:`rela_train.views.ViewParams` as the CPU views, and the
parameters are drawn from the same distributions as torchvision's and lightly's samplers (restated here
vectorised): the random resized crop's 10 trials and centre-crop fallback in source pixels, jitter factors
and a jitter order per image (torchvision's ``ColorJitter``; kornia's own ``ColorJitter`` shares one order
per batch), flip / jitter / greyscale / blur / solarisation with their probabilities
(``tests/test_device_views.py`` compares the draws and, for fixed parameters, the pixels).

What differs from the CPU views, and why it matters little:

- Resolution: a crop is resampled from the decoded picture, at most ``DECODE_FACTOR x S`` px on its longer
  side, instead of the full-size picture. A crop of scale s spans about ``sqrt(s) x 2S`` decoded pixels, so
  crops of scale >= 1/4 (every ReLA crop, scale >= 0.5) are still shrunk to S, and smaller crops are enlarged
  from at least ``0.28 x 2S`` px (scale 0.08) where the full-size picture may have more. ImageNet's pictures
  (about 400-500 px) at S = 224 lose almost nothing; 32 px CIFAR pictures at S = 32 are not resized at all.
- Filters: roi_align's box-averaged bilinear samples where Pillow uses a triangle filter; a true Gaussian
  kernel (``2 ceil(3 sigma_max) + 1`` taps, edges repeated) where Pillow approximates it with box blurs;
  bilinear crops where DINO's CPU view is bicubic; float arithmetic where Pillow rounds to 8 bits after
  every colour operation. The supervised small-image crop resizes the centre square of the source (the CPU's
  ``Resize`` + ``CenterCrop``, the same on square pictures).
- Crop borders: roi_align's samples on a crop's outer rows and columns reach the pixels just beyond the crop
  box, where the CPU's crop-then-resize repeats the box's edge pixels.

Measured with the same fixed parameters (``tests/test_device_views.py``): on real CIFAR-10 pictures at 32 px,
inside the view's 1 px border a mean difference of 0.3-1.6 grey levels (at most 7.4), on the border up to 23;
on ImageNet pictures cropped to 224 px, a mean of 0.4-4.3 levels (99th percentile at most 19.5).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from rela_convert.images import open_image, to_rgb
from rela_train.draws import Draws, GeneratorDraws
from rela_train.views import ViewParams

#: Workers decode pictures to at most this many times the training size on their longer side.
DECODE_FACTOR = 2

#: EXIF orientations that swap width and height (transpose, rotations by 90 and 270 degrees, transverse).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


def decode_size(input_size: int) -> int:
    """The longest side, pixels, of the pictures workers decode for views of ``input_size`` px."""
    return DECODE_FACTOR * input_size


def decode_for_device(data: bytes, max_side: int) -> tuple[Tensor, Tensor]:
    """Decode encoded image bytes for the device views (see the module docstring).

    Args:
        data: the encoded file content.
        max_side: the decoded picture's longer side is at most this, pixels (:func:`decode_size`).

    Returns:
        ``(pixels, sizes)``: uint8 ``[3, h, w]`` (RGB) and int64 ``[4]``: the source picture's height and
        width (EXIF orientation applied), then ``h`` and ``w``.

    Raises:
        rela_convert.images.ImageDecodeError: bytes that are not a readable image.
    """
    image = open_image(data)
    height, width = oriented_size(image)
    if image.format == "JPEG" and max(width, height) > max_side:
        scale = max_side / max(width, height)  # the DCT scale keeps at least max_side on the longer side
        image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
    picture = to_rgb(image)
    if max(picture.size) > max_side:
        scale = max_side / max(picture.size)
        target = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        picture = picture.resize(target, Image.BILINEAR)
    pixels = torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8)
    pixels = pixels.view(picture.height, picture.width, 3).permute(2, 0, 1).contiguous()
    return pixels, torch.tensor([height, width, picture.height, picture.width], dtype=torch.int64)


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """Height and width, pixels, of an opened picture (:func:`rela_convert.images.open_image`, before any draft)
    once its EXIF orientation is applied; only the header is read."""
    width, height = image.size
    try:
        orientation = image.getexif().get(0x0112)
    except Exception:  # a damaged EXIF block: decoding decides whether the picture can be used
        orientation = None
    return (width, height) if orientation in _SWAPPING_ORIENTATIONS else (height, width)


def stack_decoded(decoded: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Stack :func:`decode_for_device` outputs into one batch.

    Args:
        decoded: ``(pixels uint8 [3, h_i, w_i], sizes int64 [4])`` per image.

    Returns:
        ``(pixels, sizes)``: uint8 ``[B, 3, H, W]`` with ``H = max h_i`` and ``W = max w_i``, picture i at the
        top-left and its last row and column repeated to fill the rest (so a crop's bilinear samples at the
        picture's edge see its edge pixels, as Pillow's do); int64 ``[B, 4]``.
    """
    height = max(pixels.shape[1] for pixels, _ in decoded)
    width = max(pixels.shape[2] for pixels, _ in decoded)
    batch = torch.empty(len(decoded), 3, height, width, dtype=torch.uint8)
    for row, (pixels, _) in enumerate(decoded):
        h, w = pixels.shape[1:]
        if (h, w) == (height, width):
            batch[row] = pixels
        else:
            rows = torch.arange(height).clamp_(max=h - 1)
            cols = torch.arange(width).clamp_(max=w - 1)
            batch[row] = pixels[:, rows][:, :, cols]
    return batch, torch.stack([sizes for _, sizes in decoded])


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """Seed (an int in ``[0, 2**64)``) of the device views of batch ``step`` (0-based, within ``epoch``) on
    ``rank`` in a run seeded with ``seed``: the views depend on nothing else, so a resumed run makes the same."""
    digest = hashlib.blake2b(f"views:{seed}:{epoch}:{step}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass
class ViewDraw:
    """The random parameters of one view of a batch of B images (CPU tensors).

    Attributes:
        crops: int64 ``[B, 4]``: the crop (top, left, height, width) in source pixels (for the padded crop: the
            centre square, rounded).
        boxes: float64 ``[B, 4]``: the same crop as ``(x1, y1, x2, y2)`` in decoded pixels (pixel ``i`` spans
            ``[i, i + 1)``).
        offsets: int64 ``[B, 2]``: (top, left) of the ``S x S`` crop in the padded ``S + 2p`` image (padded crop
            only, else None).
        flip: bool ``[B]``: horizontal flip.
        jitter: bool ``[B]``: colour jitter applied.
        factors: float64 ``[B, 4]``: brightness, contrast and saturation factors and the hue shift (turns);
            1, 1, 1, 0 for an adjustment the view leaves out.
        order: int64 ``[B, 4]``: the order of the four adjustments (0 brightness, 1 contrast, 2 saturation,
            3 hue), a random permutation per image.
        grey: bool ``[B]``: greyscale.
        blur: bool ``[B]``: Gaussian blur; sigma: float64 ``[B]``, its standard deviation, pixels.
        solarize: bool ``[B]``: solarisation.
    """

    crops: Tensor
    boxes: Tensor
    offsets: Tensor | None
    flip: Tensor
    jitter: Tensor
    factors: Tensor
    order: Tensor
    grey: Tensor
    blur: Tensor
    sigma: Tensor
    solarize: Tensor


def _uniform(low: float, high: float, draws: Draws, columns: int | None = None) -> Tensor:
    return low + (high - low) * draws.uniform(columns)


def _random_int(high: Tensor, draws: Draws) -> Tensor:
    """int64 uniform in ``[0, high)`` per element (``high`` >= 1, ``[B]`` or ``[B, k]``)."""
    numbers = draws.uniform(None if high.dim() == 1 else high.shape[1])
    return (numbers * high).floor().long().clamp_(max=high - 1)


def sample_resized_crops(sizes: Tensor, scale: tuple[float, float], ratio: tuple[float, float], draws: Draws) -> Tensor:
    """torchvision's ``RandomResizedCrop`` parameters for every image, vectorised: up to 10 trials of an area
    fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio`` (width / height), the first
    that fits taken at a uniform position; else the centre crop with the ratio clamped into ``ratio``.

    Args:
        sizes: int64 ``[B, 2]``: source height and width, pixels.
        draws: the uniform numbers (:mod:`rela_train.draws`), B rows.

    Returns:
        int64 ``[B, 4]``: top, left, height, width in source pixels.
    """
    height, width = sizes[:, 0].double(), sizes[:, 1].double()
    area = (height * width)[:, None]
    target_area = area * _uniform(scale[0], scale[1], draws, 10)
    aspect = torch.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), draws, 10))
    w = torch.round(torch.sqrt(target_area * aspect))  # round half to even, as Python's round
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.to(torch.int64).argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    w, h = w.gather(1, first)[:, 0].long(), h.gather(1, first)[:, 0].long()
    # fallback: the centre crop
    in_ratio = width / height
    fallback_w = torch.where(in_ratio > max(ratio), torch.round(height * max(ratio)), width).long()
    fallback_h = torch.where(in_ratio < min(ratio), torch.round(width / min(ratio)), height).long()
    w, h = torch.where(found, w, fallback_w), torch.where(found, h, fallback_h)
    H, W = sizes[:, 0], sizes[:, 1]
    top = torch.where(found, _random_int((H - h + 1).clamp(min=1), draws), (H - h) // 2)
    left = torch.where(found, _random_int((W - w + 1).clamp(min=1), draws), (W - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def _adjust(index: int, images: Tensor, factor: Tensor) -> Tensor:
    """Colour adjustment ``index`` (0 brightness, 1 contrast, 2 saturation, 3 hue) of float ``[n, 3, S, S]`` in
    [0, 1] with per-image factors ``[n]``, as torchvision applies it to PIL images (Pillow's ``ImageEnhance``:
    blends with black, the mean grey level, the greyscale picture; a hue rotation of ``factor`` turns)."""
    from kornia import enhance

    if index == 0:
        return enhance.adjust_brightness_accumulative(images, factor)
    if index == 1:
        return enhance.adjust_contrast_with_mean_subtraction(images, factor)
    if index == 2:
        return enhance.adjust_saturation_with_gray_subtraction(images, factor)
    return enhance.adjust_hue(images, factor * (2 * math.pi))


class DeviceView:
    """One :class:`~rela_train.views.ViewParams` view applied to whole batches on their device.

    Args:
        params: the view's parameters (the same object the CPU view is built from).

    Attributes:
        params: the :class:`~rela_train.views.ViewParams`.
        blur_kernel: taps of the Gaussian blur kernel, ``2 ceil(3 sigma_max) + 1``.
    """

    def __init__(self, params: ViewParams) -> None:
        self.params = params
        self.blur_kernel = 2 * math.ceil(3 * params.blur_sigmas[1]) + 1

    def sample(self, sizes: Tensor, draws: torch.Generator | Draws) -> ViewDraw:
        """Draw the view's parameters for a batch (see the module docstring for the distributions).

        Args:
            sizes: int64 ``[B, 4]``: source height, width and decoded height, width of every image
                (:func:`decode_for_device`).
            draws: where the uniform numbers come from (:mod:`rela_train.draws`): a CPU generator (taken as
                :class:`~rela_train.draws.GeneratorDraws`) or a :class:`~rela_train.draws.KeyedDraws` of B rows;
                the parameters depend on nothing else.

        Returns:
            :class:`ViewDraw` of B images.
        """
        p, count = self.params, len(sizes)
        if isinstance(draws, torch.Generator):
            draws = GeneratorDraws(draws, count)
        sizes = sizes.cpu()
        source = sizes[:, :2]
        offsets = None
        if p.crop_padding is None:
            crops = sample_resized_crops(source, p.crop_scale, p.crop_ratio, draws)
            top, left, height, width = crops.double().unbind(1)
        else:  # the centre square of the source (Resize + CenterCrop), then a padded random crop
            side = source.min(dim=1).values.double()
            top, left = (source[:, 0] - side) / 2, (source[:, 1] - side) / 2
            height = width = side
            crops = torch.stack([top, left, height, width], dim=1).round().long()
            offsets = _random_int(torch.full((count, 2), 2 * p.crop_padding + 1), draws)
        scale_y, scale_x = sizes[:, 2] / sizes[:, 0], sizes[:, 3] / sizes[:, 1]
        boxes = torch.stack([left * scale_x, top * scale_y, (left + width) * scale_x, (top + height) * scale_y], 1)
        flip = draws.uniform() < p.flip_prob
        jitter = draws.uniform() < p.jitter_prob
        factors = torch.stack(
            [
                _uniform(max(0.0, 1 - p.brightness), 1 + p.brightness, draws),
                _uniform(max(0.0, 1 - p.contrast), 1 + p.contrast, draws),
                _uniform(max(0.0, 1 - p.saturation), 1 + p.saturation, draws),
                _uniform(-p.hue, p.hue, draws),
            ],
            dim=1,
        )
        order = draws.uniform(4, torch.float32).argsort(dim=1)
        grey = draws.uniform() < p.grey_prob
        blur = draws.uniform() < p.blur_prob
        sigma = _uniform(p.blur_sigmas[0], p.blur_sigmas[1], draws)
        solarize = draws.uniform() < p.solarize_prob
        return ViewDraw(crops, boxes, offsets, flip, jitter, factors, order, grey, blur, sigma, solarize)

    def apply(self, images: Tensor, draw: ViewDraw) -> Tensor:
        """The view of every image with the given parameters.

        Args:
            images: float32 ``[B, 3, H, W]`` in [0, 1] on the device (:func:`stack_decoded` / 255); not modified.
            draw: :class:`ViewDraw` of the B images.

        Returns:
            float32 ``[B, 3, S, S]``, normalised, on ``images``' device.
        """
        from kornia.color import rgb_to_grayscale
        from kornia.filters import gaussian_blur2d
        from torchvision.ops import roi_align

        p, device, count, size = self.params, images.device, len(images), self.params.input_size
        rois = torch.cat([torch.arange(count, dtype=torch.float64)[:, None], draw.boxes], dim=1)
        views = roi_align(
            images, rois.to(device, images.dtype), (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True
        )
        if draw.offsets is not None:
            padded = torch.nn.functional.pad(views, [p.crop_padding] * 4)
            steps = torch.arange(size, device=device)
            rows = (draw.offsets[:, :1].to(device) + steps)[:, :, None]
            cols = (draw.offsets[:, 1:].to(device) + steps)[:, None, :]
            views = padded[torch.arange(count, device=device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
        views = torch.where(draw.flip.to(device)[:, None, None, None], views.flip(-1), views).contiguous()

        def on(selected: Tensor) -> tuple[Tensor, Tensor] | None:
            rows = selected.nonzero()[:, 0]
            return (rows, rows.to(device)) if len(rows) else None

        if p.jitters:
            strengths = (p.brightness, p.contrast, p.saturation, p.hue)
            for slot in range(4):
                for adjustment in range(4):
                    chosen = on(draw.jitter & (draw.order[:, slot] == adjustment)) if strengths[adjustment] else None
                    if chosen is not None:
                        rows, index = chosen
                        factor = draw.factors[rows, adjustment].to(device, views.dtype)
                        views[index] = _adjust(adjustment, views[index], factor)
        chosen = on(draw.grey) if p.grey_prob else None
        if chosen is not None:
            views[chosen[1]] = rgb_to_grayscale(views[chosen[1]]).expand(-1, 3, -1, -1)

        def blur() -> None:
            chosen = on(draw.blur) if p.blur_prob else None
            if chosen is not None:
                sigma = draw.sigma[chosen[0]].to(device, views.dtype)[:, None].expand(-1, 2)
                kernel = (self.blur_kernel, self.blur_kernel)
                views[chosen[1]] = gaussian_blur2d(views[chosen[1]], kernel, sigma, border_type="replicate")

        def solarize() -> None:
            chosen = on(draw.solarize) if p.solarize_prob else None
            if chosen is not None:
                selected = views[chosen[1]]
                views[chosen[1]] = torch.where(selected >= p.solarize_threshold / 255, 1 - selected, selected)

        for stage in (solarize, blur) if p.solarize_first else (blur, solarize):
            stage()
        mean = torch.tensor(p.mean, device=device, dtype=views.dtype)[:, None, None]
        std = torch.tensor(p.std, device=device, dtype=views.dtype)[:, None, None]
        return (views - mean) / std

    def __call__(self, images: Tensor, sizes: Tensor, generator: torch.Generator) -> Tensor:
        """:meth:`apply` with parameters from :meth:`sample`: float32 ``[B, 3, S, S]`` on ``images``' device."""
        return self.apply(images, self.sample(sizes, generator))


class DeviceViews:
    """The two ReLA views and the method's two views of a run, made on ``device`` (``rela train --augment device``).

    Args:
        rela: the ReLA views' parameters (:func:`rela_train.views.rela_params`, twice).
        method: the method's two views' parameters (``Method.view_params(S)``).
        device: the training device.
    """

    def __init__(
        self, rela: tuple[ViewParams, ViewParams], method: tuple[ViewParams, ViewParams], device: torch.device
    ) -> None:
        self.rela = tuple(DeviceView(params) for params in rela)
        self.method = tuple(DeviceView(params) for params in method)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, pixels: Tensor, sizes: Tensor, rela: bool, seed: int) -> tuple[Tensor, Tensor]:
        """Both views of a batch.

        Args:
            pixels: uint8 ``[B, 3, H, W]`` and sizes: int64 ``[B, 4]`` (:func:`stack_decoded`), on any device.
            rela: make the ReLA views (else the method's).
            seed: seed of the parameter draws (:func:`step_seed`), an int in ``[0, 2**64)``.

        Returns:
            ``(view_1, view_2)``: float32 ``[B, 3, S, S]`` on :attr:`device`.
        """
        generator = torch.Generator().manual_seed(seed)
        images = pixels.to(self.device, non_blocking=True).float().div_(255)
        first, second = self.rela if rela else self.method
        return first(images, sizes, generator), second(images, sizes, generator)
