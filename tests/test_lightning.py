"""rela_train.lightning: lightly's BYOL example module, plus three lines, trains with pl.Trainer on converted real
CIFAR-10 (one process; two CPU processes under DDP) and resumes from a Lightning checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

pl = pytest.importorskip("pytorch_lightning")
from lightly.loss import NegativeCosineSimilarity  # noqa: E402
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead  # noqa: E402
from lightly.models.utils import deactivate_requires_grad, update_momentum  # noqa: E402

from rela_train.lightning import ReLACallback, ReLADataModule, rela_step  # noqa: E402
from rela_train.rela import AdaptiveSwitch, StaticSwitch  # noqa: E402


class BYOL(pl.LightningModule):
    """lightly's BYOL example (docs/source/examples/byol.rst), its batch read from the data module's dicts and the
    three lines of ReLA added to ``training_step``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        resnet = torchvision.models.resnet18()
        self.backbone = nn.Sequential(*list(resnet.children())[:-1])
        self.projection_head = BYOLProjectionHead(512, 1024, 256)
        self.prediction_head = BYOLPredictionHead(256, 1024, 256)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()

    def forward(self, x):
        return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

    def forward_momentum(self, x):
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    def training_step(self, batch, batch_index):
        update_momentum(self.backbone, self.backbone_momentum, m=0.99)
        update_momentum(self.projection_head, self.projection_head_momentum, m=0.99)
        loss = rela_step(self, batch)  # ReLA: these three lines
        if loss is not None:
            return loss
        x0, x1 = batch["view1"], batch["view2"]
        p0, p1 = self.forward(x0), self.forward(x1)
        z0, z1 = self.forward_momentum(x0), self.forward_momentum(x1)
        loss = 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
        self.log("byol_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)


def trainer(tmp_path, switch, epochs: int, ramp: int = 0, extra=(), **options) -> pl.Trainer:
    callback = ReLACallback(feature_dim=512, switch=switch, method_views="byol", handover_ramp=ramp)
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        callbacks=[callback, pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True), *extra],
        reload_dataloaders_every_n_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **options,
    )


def data(converted_cifar) -> ReLADataModule:
    return ReLADataModule(converted_cifar, batch_size=32, workers=0)


def test_byol_trains_with_rela_then_hands_over(converted_cifar, tmp_path):
    module, fit = BYOL(), trainer(tmp_path, AdaptiveSwitch(threshold=0.3), epochs=2)  # rho 0.37 at step 1
    before = {name: value.clone() for name, value in module.backbone.state_dict().items()}
    fit.fit(module, datamodule=data(converted_cifar))
    callback = fit.callbacks[0]
    assert callback.switch.switched and callback.switch_step == 1  # ReLA for the first step, then BYOL
    steps_per_epoch = fit.num_training_batches
    assert fit.global_step == 2 * steps_per_epoch > 2
    assert "byol_loss" in fit.callback_metrics and fit.callback_metrics["rela_active"] == 0.0
    assert not module.rela_objective.weight.requires_grad  # the fixed transfer head
    after = module.backbone.state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert module.trainer.datamodule.views(1) == "byol"


def test_static_switch_resumes_from_a_lightning_checkpoint(converted_cifar, tmp_path):
    """Epoch 0 with ReLA, epoch 1 with BYOL (static:0.5 of 2 epochs): trained in one go, and again stopped after
    epoch 0 and resumed from its checkpoint: the same weights."""
    whole = BYOL()
    trainer(tmp_path / "whole", StaticSwitch(0.5, 2), epochs=2).fit(whole, datamodule=data(converted_cifar))
    first = trainer(tmp_path / "parts", StaticSwitch(0.5, 2), epochs=1)
    first.fit(BYOL(), datamodule=data(converted_cifar))
    assert "rela_loss" in first.callback_metrics and "byol_loss" not in first.callback_metrics
    resumed, second = BYOL(), trainer(tmp_path / "parts", StaticSwitch(0.5, 2), epochs=2)
    second.fit(resumed, datamodule=data(converted_cifar), ckpt_path=tmp_path / "parts" / "checkpoints" / "last.ckpt")
    assert "byol_loss" in second.callback_metrics and second.global_step == 2 * second.num_training_batches
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


class StepLearningRates(pl.Callback):
    """The learning rate each optimiser step uses."""

    def __init__(self):
        self.rates = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.rates.append(optimizer.param_groups[0]["lr"])


def test_handover_ramp_scales_the_first_method_steps(converted_cifar, tmp_path):
    """static:0.5 of 2 epochs with a 3-step ramp: ReLA's steps at the module's rate, BYOL's first three at 1/3, 2/3
    and 3/3 of it, then the rate again; the optimiser keeps its own rate between steps."""
    rates = StepLearningRates()
    fit = trainer(tmp_path, StaticSwitch(0.5, 2), epochs=2, ramp=3, extra=[rates])
    fit.fit(BYOL(), datamodule=data(converted_cifar))
    per_epoch = fit.num_training_batches
    assert fit.callbacks[0].switch_step == per_epoch and len(rates.rates) == 2 * per_epoch
    expected = [1e-3] * per_epoch + [1e-3 / 3, 2e-3 / 3] + [1e-3] * (per_epoch - 2)
    assert rates.rates == pytest.approx(expected)
    assert fit.optimizers[0].param_groups[0]["lr"] == 1e-3
    with pytest.raises(ValueError, match="handover_ramp"):
        ReLACallback(512, handover_ramp=-1)


def test_adaptive_switch_state_resumes(converted_cifar, tmp_path):
    """A run whose adaptive switch has not fired saves its running losses; the resumed run goes on from them."""
    first = trainer(tmp_path, AdaptiveSwitch(), epochs=1)
    first.fit(BYOL(), datamodule=data(converted_cifar))
    saved = first.callbacks[0].switch.state_dict()
    second = trainer(tmp_path, AdaptiveSwitch(), epochs=2)
    resumed = BYOL()
    second.fit(resumed, datamodule=data(converted_cifar), ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    switch = second.callbacks[0].switch
    assert not switch.switched and switch.fast != AdaptiveSwitch().fast
    assert switch.slow != saved["slow"]  # went on from the saved state for another epoch
    fresh = AdaptiveSwitch()
    fresh.load_state_dict(saved)
    assert fresh == AdaptiveSwitch(**saved)


def test_two_cpu_processes_ddp(converted_cifar, tmp_path):
    module = BYOL()
    strategy = pl.strategies.DDPStrategy(
        start_method="spawn", find_unused_parameters=True, process_group_backend="gloo"
    )
    fit = trainer(tmp_path, AdaptiveSwitch(threshold=0.3), epochs=2, devices=2, strategy=strategy)
    before = {name: value.clone() for name, value in module.backbone.state_dict().items()}
    fit.fit(module, datamodule=data(converted_cifar))
    # The spawned processes hand back the trained weights and the logged metrics (rank 0's).
    assert any(not torch.equal(before[name], value) for name, value in module.backbone.state_dict().items())
    assert fit.callback_metrics["rela_active"] == 0.0 and "byol_loss" in fit.callback_metrics


def test_errors(converted_cifar, tmp_path):
    fit = pl.Trainer(max_epochs=1, accelerator="cpu", callbacks=[ReLACallback(512)], logger=False)
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs=1"):
        fit.fit(BYOL(), datamodule=data(converted_cifar))
    with pytest.raises(TypeError, match="AdaptiveSwitch or a StaticSwitch"):
        ReLACallback(512, switch="adaptive")
