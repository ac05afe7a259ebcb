import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from pytorch_lightning.callbacks import Callback
from torch import nn

from lightning_segcompress import SyntheticScenesDataModule, load_compressed
from lightning_segcompress.callbacks import PostPruning, SparsityRegularization, StructuredPruning
from lightning_segcompress.callbacks.protocol import CompressionCallback
from lightning_segcompress.pruning import PruningError, layer_widths
from lightning_segcompress.pruning.post_pruning import group_costs
from lightning_segcompress.pruning.state import pruning_history
from lightning_segcompress.sparsity import (
    SparsityError,
    add_l1_subgradient,
    batchnorm_layers,
    budget_strengths,
    channel_costs,
    context,
    redundancy,
    strengths_from_features,
)
from support.common import SMP_UNET, trainer_kwargs


def _maps(*rows):
    """1 x C x 1 x N feature maps from per-channel rows."""
    return torch.tensor(rows, dtype=torch.float32)[None, :, None, :]


def test_slimming_adds_strength_times_sign_to_gamma_gradients():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -0.2, 0.0]))
    bn.weight.grad = torch.tensor([0.1, 0.1, 0.1])
    add_l1_subgradient({"bn": bn}, {"bn": torch.full((3,), 0.01)})
    assert torch.allclose(bn.weight.grad, torch.tensor([0.11, 0.09, 0.1]))


def test_acsl_pushes_redundant_channels_harder():
    features = _maps([1.0, 0.0], [1.0, 0.0], [0.0, 1.0])  # channels 0 and 1 identical, 2 orthogonal to both
    assert torch.allclose(redundancy(features), torch.tensor([0.5, 0.5, 0.0]))
    strengths = strengths_from_features("acsl", 1e-3, features)
    assert torch.allclose(strengths, torch.tensor([1.5e-3, 1.5e-3, 0.0]))  # mean stays 1e-3
    assert strengths.mean() == pytest.approx(1e-3)


def test_cap_pushes_channels_that_give_little_context_harder():
    features = _maps([1.0, 0.0], [1.0, 0.0], [0.0, 1.0])
    e = math.e
    # softmax rows of [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    rows = [[e / (2 * e + 1), e / (2 * e + 1), 1 / (2 * e + 1)]] * 2 + [[1 / (e + 2), 1 / (e + 2), e / (e + 2)]]
    k = [sum(r[c] for r in rows) / 3 for c in range(3)]
    assert torch.allclose(context(features), torch.tensor(k), atol=1e-6)
    inverse = [1 / kc for kc in k]
    expected = [1e-3 * w / (sum(inverse) / 3) for w in inverse]
    assert torch.allclose(strengths_from_features("cap", 1e-3, features), torch.tensor(expected), atol=1e-9)


def test_budget_weights_layers_by_what_a_channel_costs():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 1),
                        nn.BatchNorm2d(6))
    layers = batchnorm_layers(net)
    macs = channel_costs(net, layers, torch.randn(1, 3, 8, 8), "macs")
    assert macs == {"1": 3 * 9 * 64, "4": 4 * 64}
    assert channel_costs(net, layers, torch.randn(1, 3, 8, 8), "params") == {"1": 27, "4": 4}
    strengths = budget_strengths(1e-3, macs, {"1": 4, "4": 6})
    mean = (1728 + 256) / 2
    assert torch.allclose(strengths["1"], torch.full((4,), 1e-3 * 1728 / mean))
    assert torch.allclose(strengths["4"], torch.full((6,), 1e-3 * 256 / mean))


class TinyModule(pl.LightningModule):
    """conv-BN-ReLU x2 and a 1x1 classifier: small enough for exact gradient checks."""

    def __init__(self, lr=0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 3, 1))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        images, masks = batch
        return F.cross_entropy(self.net(images), masks)

    def validation_step(self, batch, batch_idx):
        images, masks = batch
        self.log("val_loss", F.cross_entropy(self.net(images), masks))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _data(**overrides):
    kwargs = dict(num_classes=3, image_size=(32, 32), num_train=8, num_val=4, batch_size=4)
    return SyntheticScenesDataModule(**{**kwargs, **overrides})


class GradRecorder(Callback):
    def __init__(self):
        self.grads, self.params = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.net.named_parameters()})
        self.params.append({n: p.detach().clone() for n, p in pl_module.net.named_parameters()})


@pytest.mark.parametrize("method", ["slimming", "acsl", "cap", "budget"])
def test_callback_adds_the_penalty_to_bn_gradients_only(method, tmp_path):
    def run(callbacks):
        torch.manual_seed(0)
        module = TinyModule()
        recorder = GradRecorder()
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, limit_train_batches=1, limit_val_batches=0,
                                              callbacks=[*callbacks, recorder]))
        trainer.fit(module, _data())
        return recorder

    plain = run([]).grads[0]
    sparsity = SparsityRegularization(method=method, strength=0.01, input_size=[32, 32])
    recorded = run([sparsity])
    penalised, params = recorded.grads[0], recorded.params[0]
    for name in plain:
        difference = penalised[name] - plain[name]
        layer = name.rpartition(".")[0]
        if name.endswith(".weight") and layer in sparsity.strengths:
            expected = sparsity.strengths[layer] * torch.sign(params[name])
            assert torch.allclose(difference, expected, atol=1e-7), name
        else:
            assert torch.equal(difference, torch.zeros_like(difference)), f"{name} is not a BN scale"
    assert set(sparsity.strengths) == {"1", "4"}
    if method != "budget":  # the mean strength of every layer is `strength`
        assert all(s.mean() == pytest.approx(0.01) for s in sparsity.strengths.values())


def test_sparsity_grows_during_a_short_fit(tmp_path):
    def run(callbacks):
        torch.manual_seed(0)
        module = TinyModule(lr=0.2)
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=4, callbacks=callbacks))
        trainer.fit(module, _data())
        return module, trainer

    plain, _ = run([])
    sparsity = SparsityRegularization(method="slimming", strength=0.1, eps=0.9)
    module, trainer = run([sparsity])
    layers = batchnorm_layers(module.net)
    share = sum(float((bn.weight.abs() < 0.9).sum()) for bn in layers.values()) / 32  # all scales start at 1.0
    plain_share = sum(float((bn.weight.abs() < 0.9).sum()) for bn in batchnorm_layers(plain.net).values()) / 32
    assert share >= 0.5 and share > plain_share
    assert trainer.callback_metrics["sparsity/gamma_below_eps"] == pytest.approx(share)
    mean_abs = torch.cat([bn.weight.detach().abs() for bn in layers.values()]).mean()
    assert trainer.callback_metrics["sparsity/gamma_mean_abs"] == pytest.approx(float(mean_abs))


def test_bn_scale_pruning_removes_the_channels_the_penalty_drove_to_zero(tmp_path):
    torch.manual_seed(0)
    module = TinyModule(lr=0.2)
    sparsity = SparsityRegularization(method="acsl", strength=0.1, end_epoch=3, update_every=1)
    pruning = StructuredPruning(amount=0.25, target="channels", importance="bn_scale", start_epoch=3, round_to=None,
                                global_pruning=False, rel_tolerance=0.2, input_size=[32, 32])
    record = {}

    class BeforePruning(CompressionCallback):
        def on_before_compression(self, trainer, pl_module, event):
            record["gammas"] = {n: bn.weight.detach().abs().clone()
                                for n, bn in batchnorm_layers(pl_module.net).items()}

    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=4, callbacks=[sparsity, BeforePruning(), pruning]))
    trainer.fit(module, _data())
    history = pruning_history(module.net)
    assert history, "the pruning step ran"
    for root, _, removed in history:
        gammas = record["gammas"][{"0": "1", "3": "4"}[root]]
        smallest = torch.argsort(gammas)[:len(removed)]
        assert sorted(removed) == sorted(smallest.tolist()), f"{root}: the smallest regularised scales go"
    assert module.net[1].weight.numel() < 16
    assert all(s.numel() == module.net.get_submodule(n).weight.numel() for n, s in sparsity.strengths.items()), \
        "no strengths of the unpruned sizes are left"


def test_post_pruning_core_keeps_back_a_harmful_group_and_leaves_the_network_as_it_was():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    example = torch.randn(1, 3, 16, 16)
    step = [["0", True, [0, 1, 2]], ["3", True, [4, 5]]]
    parameters = [id(p) for p in net.parameters()]
    seen = []

    def evaluate(network):  # removing channels of layer "3" is what hurts here
        seen.append((network[0].out_channels, network[3].out_channels))
        return 0.9 if network[3].out_channels == 8 else 0.6

    result = group_costs(net, step, evaluate, example, max_miou_drop=1.0)
    assert seen == [(8, 8), (5, 8), (8, 6)], "the baseline, then each group alone, on the network itself"
    assert [(g.layer, g.undone) for g in result.groups] == [("0", False), ("3", True)]
    assert result.groups[1].cost == pytest.approx(30.0) and result.kept == [step[0]]
    assert layer_widths(net)["0"] == 8 and layer_widths(net)["3"] == 8, "every trial was rolled back"
    assert [id(p) for p in net.parameters()] == parameters, "the same parameter objects: optimizers stay valid"
    assert pruning_history(net) == []
    with pytest.raises(PruningError, match="max_miou_drop must be >= 0"):
        group_costs(net, step, evaluate, example, max_miou_drop=-1.0)


def test_post_pruning_callback_keeps_only_cheap_groups_and_checkpoints_them(tmp_path):
    torch.manual_seed(0)
    module = TinyModule()
    pruning = StructuredPruning(amount=0.4, target="channels", importance="l2", start_epoch=1, round_to=None,
                                global_pruning=False, rel_tolerance=0.2, input_size=[32, 32])
    post = PostPruning(max_group_miou_drop=0.0, eval_batches=1, input_size=[32, 32])
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[pruning, post]))
    trainer.fit(module, _data())
    (step,) = post.steps
    assert len(step["groups"]) == 2
    assert all(g["undone"] == (g["cost_points"] > 0.0) for g in step["groups"])
    kept_roots = {g["layer"] for g in step["groups"] if not g["undone"]}
    assert {name for name, _, _ in pruning_history(module.net)} == kept_roots
    for group in step["groups"]:  # an undone group's layer is back at full width
        assert (layer_widths(module.net)[group["layer"]] == 16) == group["undone"]
    report = (tmp_path / "post_pruning" / "post_pruning.md").read_text()
    assert "| root layer | channels removed | cost (points) | decision |" in report
    checkpoint = tmp_path / "post.ckpt"
    trainer.save_checkpoint(checkpoint)
    restored = load_compressed(TinyModule(), checkpoint)
    assert layer_widths(restored.net) == layer_widths(module.net)


def test_yaml_recipe_with_sparsity_pruning_post_pruning_and_kd(tmp_path):
    from lightning_segcompress.cli import main

    callbacks = [
        {"class_path": "lightning_segcompress.callbacks.SparsityRegularization",
         "init_args": {"method": "acsl", "strength": 1e-4, "end_epoch": 1, "update_every": 1}},
        {"class_path": "lightning_segcompress.callbacks.StructuredPruning",
         "init_args": {"amount": 0.3, "importance": "bn_scale", "start_epoch": 1}},
        {"class_path": "lightning_segcompress.callbacks.PostPruning", "init_args": {"max_miou_drop": 1.0,
                                                                                    "eval_batches": 1}},
        {"class_path": "lightning_segcompress.callbacks.KnowledgeDistillation",
         "init_args": {"teacher": "snapshot", "snapshot_at": "before_compression"}},
    ]
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_epochs": 2, "limit_train_batches": 2, "limit_val_batches": 1,
                    "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path / "run"), "callbacks": callbacks},
        "model": {"init_args": {"network": SMP_UNET, "num_classes": 3}},
        "data": {"init_args": {"num_classes": 3, "image_size": [64, 64], "num_train": 4, "num_val": 2,
                               "batch_size": 2}},
    }
    path = tmp_path / "sparsity.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    assert (tmp_path / "run" / "post_pruning" / "post_pruning.md").exists()


def test_errors_name_the_cause(tmp_path):
    class NoBatchNorm(TinyModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))

    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[SparsityRegularization()]))
    with pytest.raises(SparsityError, match="no affine BatchNorm layers"):
        trainer.fit(NoBatchNorm(), _data())
    with pytest.raises(ValueError, match="max_miou_drop .* must be >= 0"):
        PostPruning(max_miou_drop=-0.5)
    with pytest.warns(FutureWarning, match=r"PostPruning\(tolerance=\.\.\.\) is deprecated"):
        assert PostPruning(tolerance=1.5).max_miou_drop == 1.5
    with pytest.raises(ValueError, match="method must be one of"):
        SparsityRegularization(method="l0")
    with pytest.raises(ValueError, match="start_epoch < end_epoch"):
        SparsityRegularization(start_epoch=3, end_epoch=2)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, limit_val_batches=0, callbacks=[PostPruning()]))
    with pytest.raises(Exception, match="validation batches with labels"):
        trainer.fit(TinyModule(), _data())
