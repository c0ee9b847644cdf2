"""Training views made by NVIDIA DALI's compiled CPU operators in the DataLoader workers (``rela train --augment
dali``, the default when DALI is installed: ``pip install 'rela[dali]'``).

rela keeps everything that makes a run reproducible: its reader, the epoch plan (subset, order, equal batches per
rank), the ``--max-bad`` accounting, and every random choice. A worker hands DALI a batch's encoded bytes
(``fn.external_source``) with each image's parameters as per-sample arguments, drawn by rela from (seed, epoch, key)
(:class:`rela_train.draws.KeyedDraws` through :meth:`rela_train.device_views.DeviceView.sample`: the same samplers
as the device views, which ``tests/test_device_views.py`` compares with torchvision's and lightly's). So a view is a
function of the image, not of a library's random state, and a run killed at any step resumes bit-identically.

The graph of one view (:class:`rela_train.views.ViewParams`), all on 8-bit HWC pictures as Pillow works:

1. ``fn.decoders.image`` (libjpeg-turbo; EXIF orientation applied), once for both views;
2. the crop: ``fn.resize`` of the crop box (``roi_start``/``roi_end`` in source pixels) to ``S x S``, antialiased,
   bilinear (bicubic for a ``bicubic`` view); or, for the supervised small-image crop, ``resize_shorter`` + centre
   crop + ``fn.slice`` of the padded random crop (``out_of_bounds_policy="pad"``);
3. colour jitter (in the image's random order) and greyscale as one affine colour map per image
   (``fn.coord_transform``, :func:`_colour_maps`): brightness (blend with black), contrast (around the picture's mean
   ITU-R 601 grey level, as Pillow), saturation (blend with the luma, as Pillow), hue (a rotation about the grey
   axis), greyscale (the luma in every channel); identity where not drawn;
4. Gaussian blur (``fn.gaussian_blur``, one sigma per image, ``2 ceil(3 sigma_max) + 1`` taps) and solarisation, in
   the view's order;
5. ``fn.crop_mirror_normalize``: the horizontal flip (it commutes with every stage above), ImageNet normalisation,
   float32 CHW.

What differs from the CPU views (lightly / torchvision on PIL images), and why it matters little: DALI's decoder
may upsample chroma differently from Pillow's (a grey level or two); its resize is a separable antialiased filter
like Pillow's, but not Pillow's code; hue is a rotation about the grey axis, linear in RGB (DALI's own ``fn.hsv``
approximates it so too), where Pillow shifts the HSV hue (5.3 grey levels apart on average at the ReLA strength
0.2, ``tests/test_dali_views.py``); the colour adjustments are rounded and clipped once, at the end, where Pillow
does so after each. The parameters, their distributions and the order of the stages are the same.

The same graph runs DALI's ``mixed`` (nvJPEG) decoder and GPU operators when built with ``device="gpu"`` (a
``device_id``); rela uses the CPU graph (tested), the GPU one is untested (docs/gpu.md).
"""

from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import torch
from torch import Tensor

from rela_convert.optional import require
from rela_train.device_views import DeviceView, ViewDraw
from rela_train.draws import KeyedDraws
from rela_train.views import ViewParams

#: What ``pip install`` brings DALI (the CUDA 12 build runs on a CPU alone).
DALI_PACKAGE = "nvidia-dali-cuda120"


def dali_available() -> bool:
    """Whether NVIDIA DALI is installed (``pip install 'rela[dali]'``). Only looked up, not imported: the training
    process forks its DataLoader workers, and DALI is loaded in the workers that use it, never before a fork."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):  # no nvidia namespace package at all
        return False


class DaliDecodeError(RuntimeError):
    """DALI could not make a batch's views (an image whose header reads but whose data does not decode); the
    message is DALI's."""


class _ViewGraph:
    """One view's stages in a DALI graph and the per-sample arguments they read (see the module docstring).

    Args:
        params: the view's parameters.
        name: prefix of its external sources' names.
        device: ``cpu`` or ``gpu``: where the operators run.
    """

    def __init__(self, params: ViewParams, name: str, device: str) -> None:
        self.params, self.name, self.device = params, name, device
        self.sampler = DeviceView(params)
        self.blur_window = 2 * math.ceil(3 * params.blur_sigmas[1]) + 1

    def build(self, images):
        """The view of the decoded ``images`` (a DALI DataNode of HWC uint8 pictures): float32 CHW DataNode."""
        from nvidia.dali import fn, types

        p, size = self.params, self.params.input_size

        def source(field: str, dtype, ndim: int = 0):
            return fn.external_source(name=f"{self.name}.{field}", dtype=dtype, ndim=ndim)

        if p.crop_padding is None:
            interpolation = types.INTERP_CUBIC if p.bicubic else types.INTERP_LINEAR
            x = fn.resize(
                images,
                size=[size, size],
                roi_start=source("start", types.FLOAT, 1),
                roi_end=source("end", types.FLOAT, 1),
                roi_relative=False,
                antialias=True,
                interp_type=interpolation,
                device=self.device,
            )
        else:
            x = fn.resize(images, resize_shorter=size, antialias=True, device=self.device)
            x = fn.crop(x, crop=[size, size], device=self.device)
            x = fn.slice(
                x,
                source("anchor", types.FLOAT, 1),
                [float(size), float(size)],
                axes=[0, 1],
                normalized_anchor=False,
                normalized_shape=False,
                out_of_bounds_policy="pad",
                fill_values=0,
                device=self.device,
            )
        if p.jitters or p.grey_prob:  # one affine colour map per image (_colour_maps), around its mean colour
            mean = fn.reductions.mean(fn.cast(x, dtype=types.FLOAT), axes=[0, 1])
            offset = source("offset", types.FLOAT, 1) * fn.reductions.sum(mean * source("weights", types.FLOAT, 1))
            x = fn.coord_transform(x, M=source("matrix", types.FLOAT, 2), T=offset, dtype=types.UINT8)

        def blur(x):
            if not p.blur_prob:
                return x
            return fn.gaussian_blur(
                x, window_size=source("window", types.INT32), sigma=source("sigma", types.FLOAT), device=self.device
            )

        def solarize(x):
            if not p.solarize_prob:
                return x
            wide = fn.cast(x, dtype=types.INT16)
            inverted = wide + (wide >= source("threshold", types.INT16)) * (255 - 2 * wide)
            return fn.cast(inverted, dtype=types.UINT8)

        for stage in (solarize, blur) if p.solarize_first else (blur, solarize):
            x = stage(x)
        return fn.crop_mirror_normalize(
            x,
            mirror=source("flip", types.INT32),
            mean=[255 * value for value in p.mean],
            std=[255 * value for value in p.std],
            dtype=types.FLOAT,
            output_layout="CHW",
            device=self.device,
        )

    def arguments(self, draw: ViewDraw) -> dict[str, np.ndarray]:
        """The per-sample arguments of :meth:`build`'s external sources for the parameters ``draw``: one array per
        source, the batch on its first axis."""
        p = self.params
        args: dict[str, np.ndarray] = {}
        if p.crop_padding is None:
            crops = draw.crops.numpy().astype(np.float32)
            args["start"], args["end"] = crops[:, :2], crops[:, :2] + crops[:, 2:]
        else:
            args["anchor"] = (draw.offsets.numpy() - p.crop_padding).astype(np.float32)
        args["flip"] = draw.flip.numpy().astype(np.int32)
        if p.jitters or p.grey_prob:
            args["matrix"], args["offset"], args["weights"] = _colour_maps(draw, p.jitters)
        if p.blur_prob:
            blur = draw.blur.numpy()
            args["window"] = np.where(blur, self.blur_window, 1).astype(np.int32)
            args["sigma"] = np.where(blur, draw.sigma.numpy(), 1.0).astype(np.float32)
        if p.solarize_prob:
            args["threshold"] = np.where(draw.solarize.numpy(), p.solarize_threshold, 256).astype(np.int16)
        return {f"{self.name}.{field}": np.ascontiguousarray(values) for field, values in args.items()}


#: ITU-R 601 luma weights (Pillow's ``convert("L")``).
LUMA = np.array([0.299, 0.587, 0.114])


def _colour_maps(draw: ViewDraw, jitters: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Colour jitter (in each image's order) and greyscale as one affine map per image: ``y = M x + p (q . mean)``
    for a pixel ``x`` (RGB, 0-255) of a picture whose mean colour is ``mean``.

    Brightness (``f x``), saturation (``s x + (1 - s) luma(x)``), hue (a rotation of ``2 pi h`` about the grey axis)
    and greyscale (``luma(x)`` in every channel) are linear; contrast (``c x + (1 - c) luma(mean)``, Pillow's blend
    with the mean grey level) adds a term in the mean colour at that point. Composed in order, that term is
    ``(1 - c) A_post 1 (luma . A_pre mean)`` with ``A_pre``/``A_post`` the maps before and after contrast. Without
    Pillow's rounding and clipping between adjustments (one rounding at the end).

    Returns:
        ``(M, p, q)``: float32 ``[B, 3, 3]``, ``[B, 3]``, ``[B, 3]``.
    """
    count = len(draw.flip)
    identity = np.broadcast_to(np.eye(3), (count, 3, 3))
    before, after, contrast = identity.copy(), identity.copy(), np.ones(count)
    if jitters:
        factors, order, applied = draw.factors.numpy(), draw.order.numpy(), draw.jitter.numpy()
        grey = np.outer(np.ones(3), LUMA)
        angle = 2 * np.pi * factors[:, 3]
        axis = np.full(3, 1 / np.sqrt(3))
        cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        maps = np.empty((count, 4, 3, 3))
        maps[:, 0] = factors[:, 0, None, None] * np.eye(3)
        maps[:, 1] = np.eye(3)  # contrast: its own term below
        maps[:, 2] = factors[:, 2, None, None] * np.eye(3) + (1 - factors[:, 2, None, None]) * grey
        maps[:, 3] = (
            np.cos(angle)[:, None, None] * np.eye(3)
            + np.sin(angle)[:, None, None] * cross
            + (1 - np.cos(angle))[:, None, None] * np.outer(axis, axis)
        )
        rows = np.arange(count)
        contrast_slot = np.argmax(order == 1, axis=1)
        for slot in range(4):
            step = np.where(applied[:, None, None], maps[rows, order[:, slot]], identity)
            is_before = (slot < contrast_slot)[:, None, None]
            before = np.where(is_before, step @ before, before)
            after = np.where(is_before, after, step @ after)
        contrast = np.where(applied, factors[:, 1], 1.0)
    greyscale = draw.grey.numpy()[:, None, None]
    after = np.where(greyscale, np.outer(np.ones(3), LUMA) @ after, after)
    matrix = contrast[:, None, None] * after @ before
    offset = (1 - contrast)[:, None] * after.sum(axis=2)
    weights = np.einsum("bij,i->bj", before, LUMA)
    return matrix.astype(np.float32), offset.astype(np.float32), weights.astype(np.float32)


class DaliViews:
    """Both views of a batch of encoded images, made by one DALI pipeline (see the module docstring).

    Two pipelines, built on first use in the process that uses them (a DataLoader worker builds its own after the
    fork), with one thread each (DataLoader workers are the parallelism): ``fn.peek_image_shape`` reads every
    picture's size from its header (the crop boxes are drawn in it), then the views' graph runs.

    Args:
        first, second: the two views' parameters.
        batch_size: the most images per call.
        device: ``cpu`` (DALI's CPU operators; the tested path) or ``gpu`` (nvJPEG ``mixed`` decoding and GPU
            operators on ``device_id``).
        device_id: the GPU of ``device="gpu"``.

    Raises:
        rela_convert.optional.MissingDependency: DALI is not installed (on first use).
    """

    def __init__(
        self, first: ViewParams, second: ViewParams, batch_size: int, device: str = "cpu", device_id: int = 0
    ) -> None:
        self.views = (_ViewGraph(first, "view1", device), _ViewGraph(second, "view2", device))
        self.batch_size, self.device, self.device_id = batch_size, device, device_id
        self.pipelines, self.process = None, None

    def _build(self) -> tuple:
        """The two pipelines: the pictures' shapes (read from their headers), and the views."""
        require("nvidia.dali", "--augment dali (views made by NVIDIA DALI)")
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device == "gpu"
        settings = dict(
            batch_size=self.batch_size,
            num_threads=1,
            device_id=self.device_id if gpu else None,
            prefetch_queue_depth=1,
            exec_async=False,
            exec_pipelined=False,
            seed=0,
        )

        @pipeline_def(**settings)
        def shapes():
            return fn.peek_image_shape(fn.external_source(name="encoded", dtype=types.UINT8, ndim=1))

        @pipeline_def(**settings)
        def views():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
            return tuple(view.build(images) for view in self.views)

        built = shapes(), views()
        for pipeline in built:
            pipeline.build()
        return built

    def __call__(self, images: list[bytes], seeds: list[int]) -> tuple[Tensor, Tensor]:
        """The two views of every image.

        Args:
            images: B encoded images (JPEG, PNG, WebP, BMP), B <= ``batch_size``.
            seeds: one 64-bit seed per image (:func:`rela_train.data.batch.sample_seed`): its parameters are drawn
                from it alone (:class:`rela_train.draws.KeyedDraws`), the first view's, then the second's, in its
                height and width after its EXIF orientation (read from its header).

        Returns:
            ``(view_1, view_2)``: float32 ``[B, 3, S, S]`` each (CPU tensors).

        Raises:
            DaliDecodeError: DALI cannot read or decode one of the images (the pipelines are built anew for the
                next call).
        """
        if self.pipelines is None or self.process != os.getpid():  # a forked worker builds its own
            self.pipelines, self.process = self._build(), os.getpid()
        shapes, views = self.pipelines
        encoded = [np.frombuffer(image, dtype=np.uint8) for image in images]
        try:
            shapes.feed_input("encoded", encoded)
            sizes = torch.from_numpy(shapes.run()[0].as_array()[:, :2].astype(np.int64))
            draws = KeyedDraws(seeds)
            both = torch.cat([sizes, sizes], dim=1)  # the crop is drawn in source pixels: decoded = source size
            views.feed_input("encoded", encoded)
            for view in self.views:
                for name, values in view.arguments(view.sampler.sample(both, draws)).items():
                    views.feed_input(name, values)
            outputs = views.run()
        except RuntimeError as error:  # DALI's message: a traceback of the graph, then what it encountered
            self.pipelines = None
            lines = [line.strip() for line in str(error).split("encountered:")[-1].splitlines() if line.strip()]
            raise DaliDecodeError(lines[0].rstrip(" :") if lines else "DALI failed") from None
        return tuple(self._tensor(output) for output in outputs)

    @staticmethod
    def _tensor(output) -> Tensor:
        """A DALI output batch copied once into a new torch tensor on its device; in a DataLoader worker, into shared
        memory, where the DataLoader would otherwise copy it again to hand it to the training process."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        batch = output.as_tensor()
        if hasattr(batch, "device_id"):  # a GPU batch
            tensor = torch.empty(batch.shape(), dtype=torch.float32, device=torch.device("cuda", batch.device_id()))
        else:
            tensor = torch.empty(batch.shape(), dtype=torch.float32)
            if torch.utils.data.get_worker_info() is not None:
                tensor.share_memory_()
        feed_ndarray(batch, tensor)
        return tensor
