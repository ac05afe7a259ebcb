import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_segcompress.data import SyntheticScenesDataModule
from lightning_segcompress.models import SegmentationModule
from support.common import SMP_DEEPLAB, TV_LRASPP, trainer_kwargs


def tiny_data(num_classes=4, **kwargs):
    defaults = dict(num_classes=num_classes, image_size=(64, 64), num_train=8, num_val=4, num_test=4,
                    batch_size=4)
    defaults.update(kwargs)
    return SyntheticScenesDataModule(**defaults)


@pytest.mark.parametrize("spec", [SMP_DEEPLAB, TV_LRASPP], ids=["smp-deeplabv3plus", "tv-lraspp"])
def test_fit_validate_test_predict_and_reload(spec, tmp_path):
    torch.manual_seed(0)
    module = SegmentationModule(network=spec, num_classes=4)
    data = tiny_data()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path))
    before = [p.detach().clone() for p in module.parameters()]
    trainer.fit(module, datamodule=data)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters())), "training updated weights"
    for key in ("train_loss_epoch", "val_loss", "val_miou", "val_pixel_acc"):
        assert key in trainer.callback_metrics
    assert 0.0 <= trainer.callback_metrics["val_miou"] <= 1.0

    (val,) = trainer.validate(module, datamodule=data)
    (test,) = trainer.test(module, datamodule=data)
    assert {"val_miou", "val_pixel_acc", "val_loss"} <= set(val)
    assert {"test_miou", "test_pixel_acc", "test_loss"} <= set(test)

    predictions = trainer.predict(module, datamodule=data)
    assert predictions[0].shape == (4, 64, 64) and predictions[0].dtype == torch.int64
    assert int(predictions[0].max()) < 4

    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    reloaded = SegmentationModule.load_from_checkpoint(ckpt, weights_only=True)
    assert reloaded.hparams.network == spec
    x = torch.randn(2, 3, 64, 64)
    module.eval()
    reloaded.eval()
    assert torch.equal(module(x), reloaded(x))


def test_accepts_a_built_module_and_dict_batches(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))
    module = SegmentationModule(network=net, num_classes=3)
    assert module.net is net and "network" not in module.hparams
    batch = {"image": torch.randn(2, 3, 16, 16), "mask": torch.randint(0, 3, (2, 16, 16))}
    loss = module.training_step(batch, 0)
    assert loss.ndim == 0 and loss.requires_grad
    assert module.predict_step(batch, 0).shape == (2, 16, 16)


def test_logits_at_lower_resolution_are_upsampled():
    net = nn.Sequential(nn.Conv2d(3, 3, 3, stride=4, padding=1))
    module = SegmentationModule(network=net, num_classes=3)
    batch = (torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32)))
    assert module.training_step(batch, 0).isfinite()
    assert module.predict_step(batch, 0).shape == (2, 32, 32)


def test_ignore_index_is_excluded_from_loss():
    module = SegmentationModule(network=nn.Conv2d(3, 3, 1), num_classes=3, ignore_index=255)
    images = torch.randn(1, 3, 8, 8)
    masks = torch.randint(0, 3, (1, 8, 8))
    partly_ignored = masks.clone()
    partly_ignored[:, :4] = 255
    logits = module(images)
    expected = nn.functional.cross_entropy(logits[:, :, 4:], masks[:, 4:])
    assert torch.allclose(module.training_step((images, partly_ignored), 0), expected)


def test_aux_output_adds_weighted_loss():
    spec = {"class_path": "torchvision.models.segmentation.deeplabv3_mobilenet_v3_large",
            "init_args": {"aux_loss": True}}
    batch = (torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32)))
    torch.manual_seed(0)
    with_aux = SegmentationModule(network=spec, num_classes=3, aux_loss_weight=0.4)
    torch.manual_seed(0)
    without = SegmentationModule(network=spec, num_classes=3, aux_loss_weight=0.0)
    without.load_state_dict(with_aux.state_dict())
    with_aux.train()
    without.train()
    assert with_aux.training_step(batch, 0) > without.training_step(batch, 0)


def test_poly_schedule_and_optimizers(tmp_path):
    module = SegmentationModule(network=SMP_DEEPLAB, num_classes=4, optimizer="sgd", lr=0.1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, limit_val_batches=0))
    trainer.fit(module, datamodule=tiny_data())
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD)
    total = trainer.estimated_stepping_batches
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * (1 - 2 / total) ** 0.9)


def test_class_count_mismatch_with_data_is_reported(tmp_path):
    module = SegmentationModule(network=SMP_DEEPLAB, num_classes=5)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match="data has 4 classes but the model predicts 5"):
        trainer.fit(module, datamodule=tiny_data(num_classes=4))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"num_classes": 1}, "num_classes"), ({"optimizer": "adam"}, "optimizer"), ({"lr": 0}, "lr"),
     ({"poly_power": -1}, "poly_power")],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SegmentationModule(network=nn.Conv2d(3, 2, 1), **{"num_classes": 2, **kwargs})


def test_weights_start_the_network_from_a_pruned_checkpoint(tmp_path):
    from lightning_segcompress.pruning import PruningConfig, build_importance, measure, plan_step, prune_with_history

    torch.manual_seed(0)
    trained = SegmentationModule(network=SMP_DEEPLAB, num_classes=3)
    x = torch.randn(1, 3, 64, 64)
    plan = plan_step(trained.net, x, build_importance("l1"), "macs", 0.3, measure(trained.net, x)["macs"],
                     PruningConfig())
    prune_with_history(trained.net, plan.history, x)
    checkpoint = {"state_dict": trained.state_dict()}
    from lightning_segcompress.state import write_to_checkpoint

    write_to_checkpoint(checkpoint, trained, "net")
    torch.save(checkpoint, tmp_path / "pruned.ckpt")

    started = SegmentationModule(network=SMP_DEEPLAB, num_classes=3, weights=str(tmp_path / "pruned.ckpt"))
    assert torch.equal(started.eval()(x), trained.eval()(x))
    assert "weights" not in started.hparams
    with pytest.raises(ValueError, match="is not a file"):
        SegmentationModule(network=SMP_DEEPLAB, num_classes=3, weights=str(tmp_path / "missing.ckpt"))
    torch.save({"other.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="holds no weights for DeepLabV3Plus"):
        SegmentationModule(network=SMP_DEEPLAB, num_classes=3, weights=str(tmp_path / "wrong.pt"))
