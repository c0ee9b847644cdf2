"""Target networks (rela_convert.backbones): any torchvision classification model, stems, sizes, seeds."""

from __future__ import annotations

import pytest
import torch

from rela_convert.backbones import CIFAR_STEMS, arch_family, build_backbone, initial_backbone, resolve_stem


def spatial_size_into(backbone: torch.nn.Module, module_name: str, size: int) -> int:
    """Width of the feature map entering ``module_name`` for a ``size`` px input."""
    seen = []
    handle = backbone.get_submodule(module_name).register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0]))
    with torch.no_grad():
        backbone.eval()(torch.zeros(1, 3, size, size))
    handle.remove()
    return seen[0].shape[-1]


@pytest.mark.parametrize(
    "arch, stem, feature_dim",
    [
        ("resnet18", "cifar", 512),
        ("resnet50", "cifar-pool", 2048),
        ("shufflenet_v2_x0_5", "cifar", 1024),
        ("mobilenet_v3_small", "cifar", 576),
        ("efficientnet_b0", "cifar", 1280),
        ("regnet_x_400mf", "cifar", 400),
        ("convnext_tiny", "cifar", 768),
        ("squeezenet1_1", "cifar", 512),
        ("vgg11", "auto", 512),  # no CIFAR stem: its own, globally pooled
        ("vit_b_16", "auto", 768),  # 32 px: 2x2 patches of 16
    ],
)
def test_families_build_at_32_px_and_give_pooled_features(arch, stem, feature_dim):
    backbone, dim = build_backbone(arch, 32, stem)
    assert dim == feature_dim and backbone.training  # returned ready to train
    features = backbone(torch.randn(4, 3, 32, 32))
    assert features.shape == (4, feature_dim) and features.dtype == torch.float32
    features.sum().backward()  # trainable end to end
    assert all(parameter.grad is not None for parameter in backbone.parameters() if parameter.requires_grad)


def test_cifar_stems_keep_the_input_resolution_into_the_first_stage():
    for stem, size in (("cifar", 32), ("cifar-pool", 16), ("imagenet", 8)):  # the ReLA reference: cifar
        backbone, _ = build_backbone("resnet18", 32, stem)
        assert spatial_size_into(backbone, "layer1", 32) == size, stem
        assert backbone.conv1.kernel_size == ((7, 7) if stem == "imagenet" else (3, 3))
    for arch, first_stage, cifar, own in (
        ("mobilenet_v3_small", "features.1", 32, 16),  # 3x3 stride-2 convolution -> stride 1
        ("regnet_x_400mf", "trunk_output", 32, 16),
        ("convnext_tiny", "features.1", 32, 8),  # 4x4 stride-4 patchify -> 3x3 stride 1
    ):
        assert spatial_size_into(build_backbone(arch, 32, "cifar")[0], first_stage, 32) == cifar, arch
        assert spatial_size_into(build_backbone(arch, 32, "imagenet")[0], first_stage, 32) == own, arch


def test_auto_stem_is_cifar_only_for_small_inputs_of_architectures_that_have_one():
    assert resolve_stem("auto", 32) == "cifar" and resolve_stem("auto", 224) == "imagenet"
    assert resolve_stem("auto", 64, "convnext_tiny") == "cifar"
    assert resolve_stem("auto", 32, "vit_b_16") == resolve_stem("auto", 32, "vgg11") == "imagenet"
    assert resolve_stem("cifar-pool", 224, "resnet18") == "cifar-pool"
    assert arch_family("wide_resnet50_2") == "resnet" and arch_family("vit_b_16") not in CIFAR_STEMS


@pytest.mark.parametrize(
    "arch, size, stem, message",
    [
        ("resnet9000", 32, "auto", "unknown --arch 'resnet9000'; choose a torchvision classification model: "),
        ("resnet18", 32, "tiny", "unknown --stem 'tiny'; choose one of auto, cifar, cifar-pool, imagenet"),
        ("alexnet", 32, "imagenet", "--arch alexnet with the imagenet stem cannot take 32 px inputs"),
        ("inception_v3", 32, "auto", "--arch inception_v3 with the imagenet stem cannot take 32 px inputs"),
        ("maxvit_t", 32, "auto", "--arch maxvit_t cannot be built for 32 px inputs"),
        ("vit_b_16", 40, "auto", "the input size must be a multiple of 16, got 40 px"),
        ("vit_b_16", 32, "cifar", "--arch vit_b_16 has no CIFAR stem (only its own); use --stem auto or imagenet"),
        ("vgg11", 32, "cifar", "--arch vgg11 has no CIFAR stem"),
        ("mobilenet_v2", 32, "cifar-pool", "--stem cifar-pool needs a stem max-pool and --arch mobilenet_v2 has none"),
        ("resnet18", 0, "auto", "the input size must be a positive number of pixels"),
    ],
)
def test_unsuitable_settings_fail_before_training_with_one_line(arch, size, stem, message):
    with pytest.raises(ValueError) as caught:
        build_backbone(arch, size, stem)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_initial_backbone_is_deterministic_by_seed_and_leaves_the_global_generator_alone():
    state = torch.random.get_rng_state()
    first, dim = initial_backbone("mobilenet_v3_small", 32, "auto", seed=3)
    again, _ = initial_backbone("mobilenet_v3_small", 32, "auto", seed=3)
    other, _ = initial_backbone("mobilenet_v3_small", 32, "auto", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not first.training and dim == 576
    weights, same, different = (network.state_dict() for network in (first, again, other))
    assert all(torch.equal(weights[name], same[name]) for name in weights)
    assert not all(torch.equal(weights[name], different[name]) for name in weights)
    # what rela train draws after torch.manual_seed(seed), and what a checkpoint reloads into
    torch.manual_seed(3)
    trained, _ = build_backbone("mobilenet_v3_small", 32, "cifar")
    assert all(torch.equal(weights[name], value) for name, value in trained.state_dict().items())
    trained.load_state_dict(other.state_dict())
