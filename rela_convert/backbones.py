"""Target networks: any torchvision classification model without its classifier, with a stem chosen for the input size.

``--arch`` is any name in ``torchvision.models.list_models(module=torchvision.models)``, built
with ``torchvision.models.get_model(arch, weights=None)`` (random initialisation, nothing is
downloaded); its ``forward`` returns the pooled pre-classifier feature ``[B, D]``.

Stems (:data:`STEMS`). ``imagenet`` is the architecture's own torchvision stem. ``cifar`` keeps the
input resolution through the stem (no stride, no max-pool), as the ReLA reference does for ResNets on
32 and 64 px inputs (method.md, stage 2). Per family (feature size D; last feature map at 32 px
under ``cifar``):

- ResNet, ResNeXt, Wide ResNet (``resnet18``, ``resnet50``, ...): the 7x7 stride-2 convolution
  becomes 3x3 stride 1, no max-pool (the reference). D 512 (ResNet-18/34) or 2048; 4x4.
- DenseNet, GoogLeNet: the same. D 1024-2208 / 1024; 4x4. GoogLeNet and Inception-v3 are built
  without auxiliary heads and their dropout before the classifier is removed.
- AlexNet, SqueezeNet: the 11x11 stride-4 / 7x7 or 3x3 stride-2 convolution becomes 3x3 stride 1,
  no max-pool. D 256 / 512; 7x7 / 8x8.
- ShuffleNetV2: its 3x3 stride-2 convolution gets stride 1, no max-pool. D 1024 (x2_0: 2048); 4x4.
- MobileNetV2 / V3, EfficientNet (V1, V2), MNASNet, RegNet: the first 3x3 stride-2 convolution gets
  stride 1 (their stems have no max-pool; later stages still downsample 16x). D 1280 / 960 / 576,
  1280-2560, 1280, by width; 2x2.
- ConvNeXt, Swin (V1, V2): the 4x4 stride-4 patchify convolution becomes a 3x3 stride-1 one (one
  token per pixel). D 768-1536; 4x4.
- ViT, MaxViT, VGG, Inception-v3: no CIFAR stem: ``auto`` keeps their own stem and ``--stem cifar``
  is an error. D 768-1280 / 512 / 512 / 2048. ViT is built for ``image_size=input_size``, which
  must be a multiple of its patch size (``vit_b_16`` takes 32 px: 4 patches); MaxViT for
  ``input_size`` (its partition size 7 must divide every stage: 224 px works, 32 px does not);
  Inception-v3 needs at least 75 px.

``cifar-pool`` is the ``cifar`` convolution followed by the architecture's own stem max-pool
(ResNet, DenseNet, GoogLeNet, ShuffleNetV2, AlexNet, SqueezeNet only: feature maps half as wide
as ``cifar``'s, about 4x cheaper). ``auto`` is ``cifar`` up to :data:`CIFAR_STEM_MAX_SIZE` px
where the architecture has a CIFAR stem, else ``imagenet``. A replaced convolution is a fresh
``nn.Conv2d`` (PyTorch's default initialisation, bias as the original); a strided one keeps its
weights. Heads: the classifier becomes the identity, except that VGG and AlexNet average-pool
globally (not to 7x7 / 6x6, so D is the channel count), SqueezeNet's classifier convolution
becomes a global average pool, ConvNeXt keeps its head LayerNorm and MaxViT its pre-logits
(LayerNorm, Linear, Tanh). An input size a network cannot take (it would downsample below one
pixel, or its forward fails) is refused by :func:`build_backbone` before any training.

timm (``pip install 'rela[timm]'``): ``--arch timm:<name>[,<key>=<value>...]`` is any name in
``timm.list_models()`` (a ``.tag`` suffix allowed), built with ``timm.create_model(name,
pretrained=False, num_classes=0, img_size=<input size>, **options)`` (``img_size`` only where the model
takes it; nothing is downloaded); its ``forward`` returns timm's pooled pre-logits feature (D is
``model.num_features``, or the pre-logits width of models that have one). The options are Python
literals passed to ``create_model``, e.g. ``timm:vit_tiny_patch16_224,patch_size=4`` (8x8 patches of
4 at 32 px, D 192). timm models keep their own stem: ``auto`` is ``imagenet`` and ``cifar`` /
``cifar-pool`` are refused.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from rela_convert.optional import require

#: Inputs at most this many pixels wide use the CIFAR stem under ``--stem auto`` (method.md, stage 2).
CIFAR_STEM_MAX_SIZE = 64
#: ``auto``: CIFAR stem up to :data:`CIFAR_STEM_MAX_SIZE` px where the architecture has one, else its own.
#: ``cifar``: the stem keeps the input resolution (ResNet: 3x3 stride-1 convolution, no max-pool, the ReLA
#: reference for 32 and 64 px). ``cifar-pool``: the same convolution followed by the stem's stride-2 max-pool
#: (feature maps half as wide: about 4x cheaper than ``cifar``). ``imagenet``: the architecture's own stem
#: (ResNet: 7x7 stride-2 convolution and max-pool, feature maps a quarter as wide as ``cifar``'s: about 16x
#: cheaper at 32 px). See the module docstring for every family.
STEMS = ("auto", "cifar", "cifar-pool", "imagenet")


@dataclass(frozen=True)
class CifarStem:
    """Where an architecture's stem downsamples, and how ``--stem cifar`` undoes it.

    Attributes:
        conv: dotted path of the stem's strided convolution.
        pool: dotted path of the stem's max-pool (removed by ``cifar``, kept by ``cifar-pool``), or None.
        replace: True: the convolution becomes a fresh 3x3 stride-1 one (padding 1); False: it keeps
            its (3x3) kernel and weights, with stride 1.
    """

    conv: str
    pool: str | None
    replace: bool


#: torchvision module of an architecture (``torchvision.models.<family>``) -> its CIFAR stem; families
#: not listed (vision_transformer, maxvit, vgg, inception) have none.
CIFAR_STEMS = {
    "resnet": CifarStem("conv1", "maxpool", True),
    "densenet": CifarStem("features.conv0", "features.pool0", True),
    "googlenet": CifarStem("conv1.conv", "maxpool1", True),
    "alexnet": CifarStem("features.0", "features.2", True),
    "squeezenet": CifarStem("features.0", "features.2", True),
    "shufflenetv2": CifarStem("conv1.0", "maxpool", False),
    "mobilenetv2": CifarStem("features.0.0", None, False),
    "mobilenetv3": CifarStem("features.0.0", None, False),
    "efficientnet": CifarStem("features.0.0", None, False),
    "mnasnet": CifarStem("layers.0", None, False),
    "regnet": CifarStem("stem.0", None, False),
    "convnext": CifarStem("features.0.0", None, True),
    "swin_transformer": CifarStem("features.0.0", None, True),
}


#: ``--arch`` prefix of a timm model: ``timm:<name>[,<key>=<value>...]``.
TIMM_PREFIX = "timm:"
#: ``timm.create_model`` arguments a ``timm:`` arch may not set: rela never downloads and strips the classifier.
TIMM_RESERVED = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "num_classes")


def parse_timm_arch(arch: str) -> tuple[str, dict]:
    """``"timm:vit_tiny_patch16_224,patch_size=4"`` -> ``("vit_tiny_patch16_224", {"patch_size": 4})``.

    Each option is ``<key>=<value>``; the value is a Python literal (``4``, ``0.1``, ``True``, ``(2, 2)``) or
    else kept as a string.

    Raises:
        ValueError: no ``timm:`` prefix, an empty name, an option without ``=``, or a reserved option
            (:data:`TIMM_RESERVED`).
    """
    if not arch.startswith(TIMM_PREFIX) or not arch[len(TIMM_PREFIX) :].split(",")[0]:
        raise ValueError(f"expected timm:<name>[,<key>=<value>...], e.g. timm:vit_tiny_patch16_224, got {arch!r}")
    name, *fields = arch[len(TIMM_PREFIX) :].split(",")
    options = {}
    for field in fields:
        key, equals, text = field.partition("=")
        key = key.strip()
        if not equals or not key.isidentifier():
            raise ValueError(f"option {field!r} of {arch!r} is not <key>=<value>, e.g. patch_size=4")
        if key in TIMM_RESERVED:
            raise ValueError(f"{arch!r} may not set {key}: rela builds timm models without weights or classifier")
        try:
            options[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            options[key] = text.strip()
    return name.strip(), options


def create_timm_model(name: str, options: dict, input_size: int | None, what: str) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=0, img_size=input_size, **options)``, randomly
    initialised (nothing is downloaded), in training mode; ``img_size`` is passed only with ``input_size`` and
    only where the model takes it (as if ``create_model`` had been called without it: the same random draws),
    and ``options`` may override it. Its ``forward`` maps float ``[B, 3, S, S]`` to the pooled feature.

    Args:
        what: how messages name the model (``"--arch timm:..."``, ``"prior '...'"``).

    Raises:
        rela_convert.optional.MissingDependency: timm is not installed (``pip install 'rela[timm]'``).
        ValueError: an unknown model name, or options / an input size the model cannot be built with.
    """
    timm = require("timm", what)
    if not timm.is_model(name):
        raise ValueError(f"{what}: unknown timm model {name!r}; see timm.list_models()")
    settings = {"pretrained": False, "num_classes": 0, **options}
    try:
        if input_size is not None and "img_size" not in options:
            state = torch.get_rng_state()
            try:
                return timm.create_model(name, img_size=input_size, **settings)
            except TypeError as error:  # a model without img_size (a CNN): build it as it is
                if "img_size" not in str(error):
                    raise
                torch.set_rng_state(state)
        return timm.create_model(name, **settings)
    except (ValueError, RuntimeError, AssertionError, TypeError, KeyError) as error:
        size = f" for {input_size} px inputs" if input_size else ""
        raise ValueError(f"{what}: timm model {name!r} cannot be built{size} ({_first_line(error)})") from None


def arch_names() -> list[str]:
    """The torchvision classification model names ``--arch`` accepts, sorted."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def arch_family(arch: str) -> str:
    """The torchvision module that defines ``arch`` (``resnet50`` -> ``resnet``, ``vit_b_16`` ->
    ``vision_transformer``), without building it; ``"timm"`` for a ``timm:`` arch (:func:`parse_timm_arch`).

    Raises:
        ValueError: ``arch`` is not a torchvision classification model, or a ``timm:`` arch names no timm model
            or has malformed options.
        rela_convert.optional.MissingDependency: a ``timm:`` arch without timm installed.
    """
    if arch.startswith(TIMM_PREFIX):
        name, _ = parse_timm_arch(arch)
        if not require("timm", f"--arch {arch}").is_model(name):
            raise ValueError(f"--arch {arch}: unknown timm model {name!r}; see timm.list_models()")
        return "timm"
    names = arch_names()
    if arch not in names:
        raise ValueError(f"unknown --arch {arch!r}; choose a torchvision classification model: {', '.join(names)}")
    return torchvision.models.get_model_builder(arch).__module__.rsplit(".", 1)[-1]


def resolve_stem(stem: str, input_size: int, arch: str | None = None) -> str:
    """``auto`` -> ``cifar`` for inputs of at most 64 px, else ``imagenet``; other names unchanged.
    With ``arch``, ``auto`` is ``imagenet`` (the architecture's own stem) where it has no CIFAR stem.

    Raises:
        ValueError: ``stem`` is not one of :data:`STEMS`, or ``arch`` is unknown.
    """
    if stem not in STEMS:
        raise ValueError(f"unknown --stem {stem!r}; choose one of {', '.join(STEMS)}")
    if stem == "auto":
        small = input_size <= CIFAR_STEM_MAX_SIZE
        return "cifar" if small and (arch is None or arch_family(arch) in CIFAR_STEMS) else "imagenet"
    return stem


def strip_classifier(model: nn.Module) -> nn.Module:
    """Replace a torchvision classifier (``fc``, ``classifier``, ``heads`` or ``head``)
    by the identity so ``forward`` returns the pre-classifier feature (the priors' rule).

    Raises:
        ValueError: none of those attributes is a module.
    """
    for name in ("fc", "classifier", "heads", "head"):
        if isinstance(getattr(model, name, None), nn.Module):
            setattr(model, name, nn.Identity())
            return model
    raise ValueError(f"cannot find the classifier of {type(model).__name__} (looked for fc, classifier, heads, head)")


def _pooled_feature(model: nn.Module, family: str) -> None:
    """Remove the classifier so ``forward`` returns the globally pooled feature ``[B, D]``."""
    if family in ("convnext", "maxvit"):  # keep the head's LayerNorm (and MaxViT's pre-logits)
        model.classifier[-1] = nn.Identity()
    elif family in ("vgg", "alexnet"):
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Identity()
    elif family == "squeezenet":  # forward flattens the classifier's output
        model.classifier = nn.AdaptiveAvgPool2d(1)
    else:
        strip_classifier(model)
        if family in ("googlenet", "inception"):
            model.dropout = nn.Identity()


def _apply_cifar_stem(model: nn.Module, stem: CifarStem, keep_pool: bool) -> None:
    parent_name, _, name = stem.conv.rpartition(".")
    parent = model.get_submodule(parent_name)
    conv = getattr(parent, name)
    if stem.replace:
        setattr(parent, name, nn.Conv2d(3, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None))
    else:
        conv.stride = (1, 1)
    if stem.pool is not None and not keep_pool:
        parent_name, _, name = stem.pool.rpartition(".")
        setattr(model.get_submodule(parent_name), name, nn.Identity())


def _construction_options(arch: str, family: str, input_size: int) -> dict:
    if family == "vision_transformer":
        patch = int(arch.rsplit("_", 1)[-1])
        if input_size % patch:
            raise ValueError(
                f"--arch {arch} cuts its input into {patch}x{patch} patches: the input size must be a multiple of "
                f"{patch}, got {input_size} px"
            )
        return {"image_size": input_size}
    if family == "maxvit":
        return {"input_size": (input_size, input_size)}
    if family in ("googlenet", "inception"):
        return {"aux_logits": False, "init_weights": True}
    return {}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def build_backbone(arch: str, input_size: int, stem: str = "auto") -> tuple[nn.Module, int]:
    """A randomly initialised torchvision classification model whose ``forward`` returns the pooled feature.

    Families, stems and feature sizes: see the module docstring. The network is checked with a dry
    forward pass (eval mode, no gradients, two zero images), which also gives ``feature_dim``; it
    draws no random numbers, so the initialisation is the first draw of ``get_model`` as before.

    Args:
        arch: a name in ``torchvision.models.list_models(module=torchvision.models)``
            (``resnet18``, ``convnext_tiny``, ``mobilenet_v3_small``, ``vit_b_16``, ...), or
            ``timm:<name>[,<key>=<value>...]`` (``timm:vit_tiny_patch16_224,patch_size=4``; needs timm).
        input_size: training input size S, pixels.
        stem: one of :data:`STEMS`.

    Returns:
        ``(backbone, feature_dim)``: ``backbone`` (in training mode) maps float ``[B, 3, S, S]``
        to float ``[B, feature_dim]`` (512 for ResNet-18/34, 2048 for ResNet-50+).

    Raises:
        ValueError: unknown arch or stem, a ``cifar`` / ``cifar-pool`` stem the architecture does
            not have (timm models have none), a ViT input size that is not a multiple of its patch size,
            or an input size the network cannot take (it downsamples below one pixel, or its forward fails).
        rela_convert.optional.MissingDependency: a ``timm:`` arch without timm installed.
    """
    family = arch_family(arch)
    if input_size < 1:
        raise ValueError(f"the input size must be a positive number of pixels, got {input_size}")
    stem = resolve_stem(stem, input_size, arch)
    cifar = CIFAR_STEMS.get(family)
    if stem != "imagenet" and cifar is None:
        hint = " (timm models keep their own stem; a ViT takes a smaller patch_size option)" if family == "timm" else ""
        raise ValueError(f"--arch {arch} has no CIFAR stem (only its own){hint}; use --stem auto or imagenet")
    if stem == "cifar-pool" and cifar.pool is None:
        raise ValueError(f"--stem cifar-pool needs a stem max-pool and --arch {arch} has none; use --stem cifar")
    if family == "timm":
        name, options = parse_timm_arch(arch)
        model = create_timm_model(name, options, input_size, f"--arch {arch}")
    else:
        options = _construction_options(arch, family, input_size)
        try:
            model = torchvision.models.get_model(arch, weights=None, **options)
        except (ValueError, RuntimeError, AssertionError, TypeError) as error:
            raise ValueError(
                f"--arch {arch} cannot be built for {input_size} px inputs ({_first_line(error)})"
            ) from None
        _pooled_feature(model, family)
        if stem != "imagenet":
            _apply_cifar_stem(model, cifar, keep_pool=stem == "cifar-pool")
    model.eval()
    try:
        with torch.no_grad():
            output = model(torch.zeros(2, 3, input_size, input_size))
    except Exception as error:  # any failure of the dry run is an unsuitable size
        raise ValueError(
            f"--arch {arch} with the {stem} stem cannot take {input_size} px inputs ({_first_line(error)}); "
            "use a larger --input-size or a stem that downsamples less"
        ) from None
    finally:
        model.train()
    if output.ndim != 2 or len(output) != 2:
        raise ValueError(f"--arch {arch} returns {tuple(output.shape)} for 2 images, not a pooled [2, D] feature")
    return model, int(output.shape[1])


def initial_backbone(arch: str, input_size: int, stem: str, seed: int) -> tuple[nn.Module, int]:
    """The backbone exactly as ``rela train --seed seed`` initialises it (the first draw after
    ``torch.manual_seed(seed)``), without touching the global random state.

    This is the reference's "Rand." prior (a copy of the target network's own random
    initialisation, method.md stage 2) and the ``untrained`` row of ``rela study``.

    Returns:
        ``(backbone in eval mode, feature_dim)``, as :func:`build_backbone`.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone, feature_dim = build_backbone(arch, input_size, stem)
    return backbone.eval(), feature_dim
