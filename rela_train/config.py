"""The options of ``rela train`` (:class:`TrainConfig`) and ``rela study`` (:class:`StudyOptions`), declared once.

Each field is declared with :func:`rela_convert.options.option`: its default, its help (with units) and its allowed
values. The click options and ``--help`` of ``rela train`` and ``rela study``, their ``--config`` TOML keys, the
checks of a config given in Python (:meth:`TrainConfig.check`), what a run records in ``RUN/config.json`` and its
checkpoint (:meth:`TrainConfig.identity`) and what ``rela study`` passes on to every run all come from these
declarations: adding a training option is one field here, plus the code that uses it.

Defaults from method.md (BYOL on CIFAR-sized data). Importing this module imports nothing heavy (no torch), so that
``rela --help`` stays fast: choices defined in heavy modules are named as ``"module:attribute"``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from rela_convert.config import SUBSET_CHOICES, SUBSET_HELP
from rela_convert.options import ALWAYS_EXISTED, Option, check, option
from rela_train.handover import HANDOVERS

#: Learning-rate schedules (:meth:`rela_train.trainer.Trainer.lr_at`): ``constant`` (the reference) and ``cosine``.
LR_SCHEDULES = ("constant", "cosine")
#: Where and how the training views are made (``rela train --augment``): ``auto`` (``dali`` when DALI imports, else
#: ``cpu``), in the DataLoader workers by DALI a batch at a time (``dali``) or image by image (``cpu``), or on the
#: training device (``device``).
AUGMENTS = ("auto", "dali", "cpu", "device")


def resolve_augment(augment: str) -> str:
    """``--augment`` as a run uses it: ``auto`` is ``dali`` when NVIDIA DALI imports (``pip install 'rela[dali]'``),
    else ``cpu``; the other values are kept.

    Raises:
        ValueError: not one of :data:`AUGMENTS`.
        rela_convert.optional.MissingDependency: ``dali`` without DALI installed.
    """
    if augment not in AUGMENTS:
        raise ValueError(f"augment is one of {', '.join(AUGMENTS)}, not {augment!r}")
    from rela_train.dali_views import dali_available

    if augment == "auto":
        return "dali" if dali_available() else "cpu"
    if augment == "dali" and not dali_available():
        from rela_convert.optional import require

        require("nvidia.dali", "--augment dali (views made by NVIDIA DALI)")
    return augment


#: ``--verify-shards``: check each shard's SHA-256 the first time a run reads it (``first``), or never (``off``).
VERIFY_SHARDS = ("first", "off")
#: ``--nan-policy``: a non-finite loss stops the run (``stop``) or its step makes no update (``skip``).
NAN_POLICIES = ("stop", "skip")


@dataclass(frozen=True)
class TrainConfig:
    """Options of ``rela train`` (each field's help says what it does, in which units).

    ``lr``, ``weight_decay`` and ``momentum`` default (None) to the method's own defaults; ``data_ratio``,
    ``input_size``, ``storage`` and ``subset`` (None) to the converted dataset's; ``stem`` ``auto`` is resolved for
    the input size (:func:`rela_train.setup.resolve_config` fills all of them in: what a run records). Options
    marked ``runtime`` (``save_every``, ``nan_policy``, ``max_bad``, ``verify_shards``) do not change what a run
    computes: a run may resume with other values. ``shuffle_buffer`` (samples each DataLoader worker holds for
    shuffling) is no command-line option.
    """

    arch: str = option(
        "resnet18",
        "Target network: any torchvision classification model, randomly initialised, without its classifier "
        "(resnet18, resnet50, wide_resnet50_2, convnext_tiny, mobilenet_v3_small, efficientnet_b0, regnet_y_400mf, "
        "swin_t, vit_b_16, ...; rela_convert/backbones.py lists the families), or a timm model: "
        "timm:<name>[,<key>=<value>...] (e.g. timm:vit_tiny_patch16_224,patch_size=4; pip install 'rela[timm]').",
    )
    stem: str = option(
        "auto",
        "Stem of --arch. cifar: the stem keeps the input resolution (ResNet: 3x3 stride-1 convolution, no "
        "max-pool, the reference for 32 and 64 px; MobileNet / EfficientNet / RegNet / ShuffleNet: the "
        "first convolution at stride 1; ConvNeXt / Swin: a 3x3 stride-1 convolution instead of the 4x4 "
        "patchify one; ViT, MaxViT, VGG, Inception-v3 have none); cifar-pool: the same, then the stem's "
        "stride-2 max-pool (ResNet, DenseNet, GoogLeNet, ShuffleNet, AlexNet, SqueezeNet; about 4x "
        "cheaper); imagenet: the architecture's own stem (ResNet: 7x7 stride-2 convolution and max-pool, "
        "about 16x cheaper at 32 px); auto: cifar up to 64 px where the architecture has one, else imagenet.",
        choices="rela_convert.backbones:STEMS",
    )
    method: str = option(
        "byol",
        "Training method used after (or, with --rela off, instead of) ReLA, with its own heads, views and loss "
        "(rela_train/methods/, one file each; docs/methods.md).",
        choices="rela_train.methods.base:METHODS",
    )
    rela: str = option(
        "guarded",
        "When ReLA hands over to the method. guarded (our default): when the ReLA loss plateaus (the reference "
        "rule), try the method for one --monitor-every interval and keep it only if the online kNN monitor "
        "gained at least as much as under ReLA the interval before, less its noise (0.5/sqrt(monitor test "
        "images)), else roll back to ReLA (no monitor folders: ReLA to the end); guarded:<c>: the same, "
        "proposing from epoch int(c * epochs) on too; adaptive: switch for good when the ReLA loss plateaus "
        "(the reference rule); static:<c>: ReLA while epoch < int(c * epochs); off: the plain method. "
        "Details: docs/handover.md.",
        metavar="MODE",
    )
    handover: str = option(
        "warm",
        "How the method takes over. warm: during ReLA the method's heads are also fitted by its loss on the "
        "backbone's detached features (the backbone trains exactly as ReLA alone); reference: the heads "
        "first train at the switch.",
        choices=HANDOVERS,
        old_value="reference",
    )
    handover_ramp: int = option(
        0,
        "Raise the learning rate linearly from 0 over this many optimiser steps after the switch; 0: none.",
        min=0,
        metavar="STEPS",
        old_value=0,
    )
    transfer_head: str = option(
        "fixed",
        "The linear map W from backbone feature to prior target. fixed: W keeps its random initialisation "
        "(the reference); trained: W is optimised with the backbone.",
        choices="rela_train.rela:TRANSFER_HEADS",
    )
    epochs: int = option(100, "Epochs; each trains on floor(data_ratio * N) images.", min=1)
    batch_size: int = option(
        128,
        "Images per optimiser step and process (128 for CIFAR / Tiny-ImageNet, 512 for ImageNet in the paper).",
        min=2,
    )
    lr: float | None = option(None, "AdamW learning rate. [default: the method's; 0.001 for every built-in]")
    lr_schedule: str = option(
        "constant",
        "constant: --lr throughout (the reference); cosine: --lr decayed per step to 0 at the run's last step "
        "(lr x 0.5 (1 + cos(pi x step / total steps))), over the ReLA and method phases alike.",
        choices=LR_SCHEDULES,
        old_value="constant",
    )
    weight_decay: float | None = option(None, "AdamW weight decay. [default: the method's; 0.01 for every built-in]")
    momentum: float | None = option(
        None,
        "Base momentum of the method's EMA networks (BYOL, MoCo, DINO); ignored by the others. "
        "[default: the method's; 0.99, the reference's]",
        min=0,
        max=1,
    )
    input_size: int | None = option(
        None,
        "Training input size, pixels. [default: the data's: the median shorter side the conversion saw, at "
        "most 224 (32 for CIFAR); never the prior's]",
        min=8,
    )
    storage: str | None = option(
        None,
        "Which stored format to read when the dataset has several. [default: the dataset's]",
        choices="rela_convert.dataset.formats:STORAGE_FORMATS",
    )
    workers: int = option(2, "DataLoader worker processes per training process (decode + augmentation).", min=0)
    augment: str = option(
        "auto",
        "Where and how the training views are made. dali: in the DataLoader workers, a batch at a time, by NVIDIA "
        "DALI's compiled CPU operators, with every random parameter drawn by rela from (seed, epoch, image) "
        "(rela_train/dali_views.py; pip install 'rela[dali]'). cpu: in the workers, image by image (lightly / "
        "torchvision on PIL images; 2-10x more CPU time per image). device: the workers only decode (to at most 2x "
        "--input-size px on the longer side); random resized crop, flip, colour jitter, greyscale, blur and "
        "solarisation run on the training device on whole batches (rela_train/device_views.py). All three draw the "
        "parameters from the same distributions. auto: dali when DALI is installed, else cpu.",
        choices=AUGMENTS,
        old_value="cpu",
    )
    device: str = option("auto", "auto (CUDA when available), cpu, cuda or cuda:N. CUDA trains in bf16 autocast.")
    log_every: int = option(10, "Write a metrics.jsonl line every this many steps.", min=1)
    monitor_train: str | None = option(
        None,
        "Online kNN monitor: labelled images DIR/<class>/<images> used as kNN memory (kept decoded in memory:"
        " keep it small, e.g. 100 per class).",
        folder=True,
    )
    monitor_test: str | None = option(
        None,
        "Online kNN monitor: labelled test images, same class folders as --monitor-train. Files of either folder"
        " that are not images or do not decode are left out and listed in RUN/monitor_skipped.jsonl. Both"
        " folders are recorded as absolute paths: a run resumes from any working folder.",
        folder=True,
    )
    monitor_every: int = option(
        0,
        "Evaluate the monitor before the first step, every this many optimiser steps and after the last; "
        "records (step, images_seen, monitor_knn_top1) go to metrics.jsonl. 0: off.",
        min=0,
    )
    data_ratio: float | None = option(
        None,
        "Data ratio r: images per epoch = floor(r*N), drawn afresh each epoch. [default: the dataset's]",
        min=0,
        max=1,
        min_open=True,
        commands=("train",),
    )
    subset: str | None = option(
        None,
        "Per-epoch subset strategy; every strategy draws floor(r*N) images per epoch, deterministically from "
        "--seed and the epoch (dedup: at most its pool). " + SUBSET_HELP + " [default: the dataset's]",
        choices=SUBSET_CHOICES,
        commands=("train",),
    )
    seed: int = option(0, "Seed of initialisation, subset draws and data order.", commands=("train",))
    save_every: int = option(
        0,
        "Also save RUN/checkpoint.pt every this many steps (0: at the end of every epoch only). A run killed at "
        "any point (even SIGKILL) and started again with the same command resumes at its checkpoint's step and, "
        "on the CPU, ends with bit-identical weights. SIGTERM / SIGINT end the current step, save and stop the "
        "run with a one-line message (exit status 143 / 130); a second signal stops at once.",
        min=0,
        commands=("train",),
        runtime=True,
    )
    nan_policy: str = option(
        "stop",
        "A NaN or infinite loss: stop (at once, naming the step, phase and last good checkpoint) or skip (that "
        "step makes no update; counted as skipped_steps in metrics.jsonl and summary.json; more than 10 in a "
        "row stop the run).",
        choices=NAN_POLICIES,
        commands=("train",),
        runtime=True,
    )
    max_bad: float = option(
        0.001,
        "Samples whose image does not decode or whose feature is malformed are replaced by another sample of "
        "their batch and listed in RUN/skipped.jsonl (step, key, shard, reason); the run stops when more than "
        "this fraction of the samples read (counted over at least one epoch) are bad. 0: stop at the first.",
        min=0,
        max=1,
        commands=("train",),
        runtime=True,
    )
    verify_shards: str = option(
        "first",
        "first: check each shard's SHA-256 against the index the first time the run reads it (in the loader "
        "workers; remembered in RUN/verified_shards.json, also across resumes); a mismatch stops the run. "
        "off: never.",
        choices=VERIFY_SHARDS,
        commands=("train",),
        runtime=True,
    )
    shuffle_buffer: int = 2000

    def check(self) -> None:
        """Check every option against its declared range and choices.

        Raises:
            ValueError: the first option out of range or not among its choices (the message names its flag).
        """
        check(self)

    def identity(self) -> dict:
        """The options that make a run what it is (all but the ``runtime`` ones), as a dict: what a checkpoint
        records and a resumed run must match. An option at its ``old_value`` (the value runs saved before it existed
        had: ``augment`` ``cpu``, ``lr_schedule`` ``constant``, ``handover`` ``reference``, ``handover_ramp`` 0) is
        left out, so that those runs resume."""
        identity = {}
        for item in fields(self):
            spec, value = item.metadata.get("option", Option("")), getattr(self, item.name)
            if not spec.runtime and (spec.old_value is ALWAYS_EXISTED or value != spec.old_value):
                identity[item.name] = value
        return identity


@dataclass(frozen=True)
class StudyOptions:
    """What ``rela study`` compares (each field's help says what it does); the training options of its runs are a
    :class:`TrainConfig`."""

    ratios: tuple[float, ...] = option(
        (0.1, 0.2, 0.5),
        "Data ratios of the ReLA arms, comma-separated (fractions of the baseline's images).",
        items=float,
    )
    seeds: tuple[int, ...] = option((0, 1), "Seeds, comma-separated; every arm runs once per seed.", items=int)
    subsets: tuple[str, ...] = option(
        ("random",),
        "Subset strategies of the ReLA arms, comma-separated (random is the paper's rule; the others need rela "
        "select first). " + SUBSET_HELP,
        items=str,
        choices=SUBSET_CHOICES,
    )
    transfer_heads: tuple[str, ...] = option(
        ("fixed",),
        "Transfer heads of the ReLA arms, comma-separated: fixed (the reference), trained.",
        items=str,
        choices="rela_train.rela:TRANSFER_HEADS",
    )
    rules: tuple[str, ...] = option(
        (),
        "Switch rules of the ReLA arms, comma-separated, each trained at every ratio (the spellings of --rela; "
        "off: the method alone at that ratio), e.g. guarded,static:1,off draws the default rule beside ReLA alone "
        "and the method alone. [default: --rela]",
        items=str,
    )
    probe_epochs: int = option(
        0,
        "Also evaluate every run with a linear probe trained this many epochs (Adam lr 3e-4, batch 128; "
        "mean of the last 3 epochs); 0: kNN only.",
        flag="--linear-probe-epochs",
        min=0,
    )
    eval_workers: int = option(2, "DataLoader workers of the final evaluation.", min=0)
