"""Setting a run up: everything :class:`rela_train.trainer.Trainer` builds before the first step, in that order.

:func:`resolve_config` fills in the defaults that come from the dataset and the method (what a run records);
:func:`join_processes` joins the other training processes and picks this one's device; :func:`build_stream` opens
the data stream; :func:`build_model` assembles the backbone, the method and the ReLA transfer head
(:class:`ReLAModel`) on the device, :func:`build_optimizer` its optimiser and :func:`replicated` its
``DistributedDataParallel`` wrapper; :func:`build_device_views` the views made on the training device. Batch norm
is synchronised across GPU processes (``SyncBatchNorm``), as in the reference; PyTorch implements it for GPUs only,
so CPU processes (gloo) keep per-process batch statistics.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rela_convert.backbones import build_backbone, resolve_stem
from rela_convert.dataset.converted import ConvertedDataset
from rela_convert.dataset.subset import load_strategy
from rela_convert.devices import resolve_device
from rela_convert.distributed import Ranks
from rela_train.config import TrainConfig, resolve_augment
from rela_train.data.stream import TrainStream
from rela_train.device_views import DeviceViews
from rela_train.methods import METHODS, MethodSettings
from rela_train.methods.base import resolved_option
from rela_train.rela import ReLAObjective
from rela_train.views import rela_params


def resolve_config(config: TrainConfig, dataset: ConvertedDataset) -> TrainConfig:
    """``config`` with the defaults that come from the dataset (data ratio, input size, storage, subset strategy)
    and from the method (lr, weight decay, momentum) filled in, the stem resolved, the monitor folders made absolute
    and, under ``--rela off`` (no hand-over), the hand-over options set to ``reference`` and 0, ``--augment auto``
    resolved (:func:`rela_train.config.resolve_augment`): what a run records and resumes by.

    Raises:
        rela_convert.optional.MissingDependency: ``--augment dali`` without DALI installed.
        rela_convert.registry.RegistryError: unknown method.
        ValueError: the method needs labels and the dataset has no class folders.
    """
    method = METHODS.get(config.method)
    if method.needs_labels and not dataset.index.classes:
        raise ValueError(
            f"--method {config.method} trains on class labels, but {dataset.root} was converted from a tree "
            "without class folders"
        )
    input_size = config.input_size or dataset.train_size
    handover = (config.handover, config.handover_ramp) if config.rela != "off" else ("reference", 0)  # no hand-over
    monitor_train, monitor_test = (
        folder and os.path.abspath(folder) for folder in (config.monitor_train, config.monitor_test)
    )
    return replace(
        config,
        lr=resolved_option(method, "lr", config.lr),
        weight_decay=resolved_option(method, "weight_decay", config.weight_decay),
        momentum=resolved_option(method, "momentum", config.momentum),
        data_ratio=config.data_ratio or float(dataset.index.subset["data_ratio"]),
        input_size=input_size,
        storage=dataset.storage,
        subset=config.subset or dataset.index.subset["strategy"],
        stem=resolve_stem(config.stem, input_size, config.arch),
        handover=handover[0],
        handover_ramp=handover[1],
        monitor_train=monitor_train,
        monitor_test=monitor_test,
        augment=resolve_augment(config.augment),
    )


class ReLAModel(nn.Module):
    """A training method plus the ReLA transfer head; ``forward`` returns the step's losses.

    Args:
        method: a :class:`rela_train.methods.Method` (has ``backbone``, ``loss`` and ``head_loss``).
        feature_dim: D_target of the backbone.
        target_dim: d = min(D_target, D_prior).
        transfer_head: ``fixed`` (the reference: ``W`` keeps its random initialisation) or ``trained``.
        seed: the transfer head's initialisation seed (:class:`rela_train.rela.ReLAObjective`).
        handover: ``reference`` or ``warm`` (:mod:`rela_train.handover`: during ReLA the method's heads are also
            fitted on the backbone's detached features).
    """

    def __init__(
        self,
        method: nn.Module,
        feature_dim: int,
        target_dim: int,
        transfer_head: str = "fixed",
        handover: str = "reference",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.method = method
        self.transfer = ReLAObjective(feature_dim, target_dim, transfer_head, seed)
        self.warm_heads = handover == "warm"

    def forward(
        self, view_1: torch.Tensor, view_2: torch.Tensor, targets: torch.Tensor | None, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(loss to optimise, ReLA loss)``, scalars. With ``targets`` (float ``[B, d]``): the ReLA loss of the two
        views, plus with warm heads the method's :meth:`~rela_train.methods.Method.head_loss` on the backbone's
        detached features (no gradient reaches the backbone from it). Without (None): the method's own loss
        (``labels`` int64 ``[B]``, -1: none), and None."""
        if targets is None:
            return self.method.loss(view_1, view_2, labels), None
        backbone = self.method.backbone
        feature_1, feature_2 = backbone(view_1), backbone(view_2)
        loss = self.transfer(feature_1, feature_2, targets)
        if not self.warm_heads:
            return loss, loss
        return loss + self.method.head_loss(feature_1.detach(), feature_2.detach(), labels), loss


def join_processes(device_name: str) -> tuple[Ranks, torch.device]:
    """This process among the training processes (joining their group under ``torchrun`` / ``--nproc``: NCCL on
    GPUs, gloo on the CPU) and its device: ``cuda:<local rank>`` for several GPU processes, else
    :func:`rela_convert.devices.resolve_device` of ``device_name``."""
    device = resolve_device(device_name)
    ranks = Ranks.from_environment("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda" and ranks.distributed:
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)  # collectives of Python objects use the current device
    return ranks, device


def build_stream(dataset: ConvertedDataset, config: TrainConfig, ranks: Ranks) -> TrainStream:
    """The data stream of this rank (a resolved ``config``): ReLA views, then the method's own after the switch.

    Raises:
        SelectionError: the subset strategy needs a selection the dataset does not hold.
    """
    return TrainStream(
        dataset,
        config.input_size,
        METHODS.get(config.method).views(config.input_size),
        config.data_ratio,
        config.seed,
        config.batch_size,
        ranks.rank,
        ranks.world,
        config.shuffle_buffer,
        load_strategy(dataset.root, dataset.index, config.subset, dataset.keys),
        verify_shards=config.verify_shards,
        augment=config.augment,
    )


def build_model(
    config: TrainConfig, dataset: ConvertedDataset, steps_per_epoch: int, ranks: Ranks, device: torch.device
) -> tuple[ReLAModel, int]:
    """The backbone (initialised from ``torch.manual_seed(config.seed)``), the method around it and the ReLA
    transfer head to ``d = min(D_target, D_prior)`` (from its own generator seeded by ``config.seed``, so its
    initialisation does not depend on what was built before it: :class:`rela_train.rela.ReLAObjective`), on
    ``device`` (batch norm synchronised across GPU processes).

    Returns:
        ``(model, feature_dim)``: the :class:`ReLAModel` and D_target.

    Raises:
        ValueError: an architecture, stem or input size that cannot be built.
    """
    torch.manual_seed(config.seed)
    backbone, feature_dim = build_backbone(config.arch, config.input_size, config.stem)
    settings = MethodSettings(
        feature_dim=feature_dim,
        input_size=config.input_size,
        num_classes=len(dataset.index.classes),
        momentum=config.momentum,
        total_steps=steps_per_epoch * config.epochs,
        steps_per_epoch=steps_per_epoch,
    )
    method = METHODS.get(config.method)(backbone, settings)
    target_dim = min(feature_dim, dataset.pca.feature_dim)
    model = ReLAModel(method, feature_dim, target_dim, config.transfer_head, config.handover, config.seed)
    if ranks.distributed and device.type == "cuda":  # the reference trains with synchronised batch norm;
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # PyTorch syncs it on GPUs only
    return model.to(device), feature_dim


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, at the resolved ``lr`` and ``weight_decay`` (the reference's)."""
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )


def replicated(model: ReLAModel, ranks: Ranks, device: torch.device) -> nn.Module:
    """What the training step calls: ``model`` itself, or under several processes its ``DistributedDataParallel``
    replica (each phase leaves some parameters unused: the transfer head, or the method's heads)."""
    if not ranks.distributed:
        return model
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
    )


def build_device_views(config: TrainConfig, device: torch.device) -> DeviceViews | None:
    """With ``--augment device``, the maker of both views of every batch on the training device (ReLA's, then the
    method's own); None with ``--augment cpu`` (the DataLoader workers make them)."""
    if config.augment != "device":
        return None
    method_views = METHODS.get(config.method).view_params(config.input_size)
    return DeviceViews((rela_params(config.input_size),) * 2, method_views, device)
