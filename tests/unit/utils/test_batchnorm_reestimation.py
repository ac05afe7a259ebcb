"""BatchNorm re-estimation after structural changes: the core algorithm (exact full-data statistics, modes, frozen
layers, atomicity) and the protocol (every producer, PostPruning's trials, the budget, user modules, bf16)."""

import copy

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_segcompress.callbacks import (
    CompressionCallback,
    PostPruning,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    ShuntReplacement,
    StructuredPruning,
)
from lightning_segcompress.pruning.post_pruning import group_costs
from lightning_segcompress.utils.batchnorm import BatchNormError, reestimate_batchnorm
from lightning_segcompress.utils.rollback import restore, snapshot
from support.common import trainer_kwargs

# ---- the core algorithm ---------------------------------------------------------------------------------------


def _stem(channels: int = 6) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.Dropout(0.5), nn.Conv2d(channels, 4, 1), nn.BatchNorm2d(4))


def _images(count: int = 4, batch: int = 5, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 8, 8, generator=generator) * 2 + 0.5 for _ in range(count)]


def test_statistics_equal_the_full_data_mean_and_unbiased_variance():
    torch.manual_seed(0)
    network = _stem().eval()
    data = _images()
    report = reestimate_batchnorm(network, data)
    with torch.no_grad():
        features = network[0](torch.cat(data))
    assert (report.layers, report.batches, report.images) == (2, 4, 20)
    torch.testing.assert_close(network[1].running_mean, features.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(network[1].running_var, features.var((0, 2, 3), unbiased=True), atol=1e-4, rtol=1e-4)


def test_max_batches_caps_the_data_and_zero_does_nothing():
    network = _stem().eval()
    before = network[1].running_mean
    assert reestimate_batchnorm(network, _images(), max_batches=0).layers == 0
    assert network[1].running_mean is before
    assert reestimate_batchnorm(network, _images(), max_batches=2).batches == 2
    with pytest.raises(ValueError, match="max_batches must be >= 0"):
        reestimate_batchnorm(network, _images(), max_batches=-1)


def test_modes_are_restored_and_frozen_layers_left_alone():
    network = _stem().train()
    network[5].eval()  # the user froze this BN
    frozen = (network[5].running_mean.clone(), network[5].running_var.clone())
    seen = {}
    network[3].register_forward_hook(lambda m, a, o: seen.update(dropout_training=m.training))
    report = reestimate_batchnorm(network, _images())
    assert report.layers == 1
    assert seen["dropout_training"] is True  # dropout as the user set it
    assert network.training and network[1].training and not network[5].training
    torch.testing.assert_close(network[5].running_mean, frozen[0])
    torch.testing.assert_close(network[5].running_var, frozen[1])
    assert all(p.grad is None for p in network.parameters())


def test_a_network_in_eval_mode_stays_in_eval_mode():
    network = _stem().eval()
    reestimate_batchnorm(network, _images())
    assert not any(m.training for m in network.modules())


def test_old_statistics_tensors_are_never_written_so_a_snapshot_restores_them():
    network = _stem().eval()
    old_mean, old_copy = network[1].running_mean, network[1].running_mean.clone()
    before = snapshot(network)
    reestimate_batchnorm(network, _images())
    assert not torch.equal(network[1].running_mean, old_copy)
    torch.testing.assert_close(old_mean, old_copy)
    restore(network, before)
    assert network[1].running_mean is old_mean


def test_a_failing_pass_leaves_the_network_unchanged():
    network = _stem().eval()
    before = [(m.running_mean, m.running_var) for m in network if isinstance(m, nn.BatchNorm2d)]
    with pytest.raises(BatchNormError, match="rolled back"):
        reestimate_batchnorm(network, [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 8, 8)])  # wrong channels
    after = [(m.running_mean, m.running_var) for m in network if isinstance(m, nn.BatchNorm2d)]
    assert all(a[0] is b[0] and a[1] is b[1] for a, b in zip(after, before))
    assert not any(m.training for m in network.modules())
    with pytest.raises(BatchNormError, match="no batch"):
        reestimate_batchnorm(network, [])


def test_without_batchnorm_it_is_a_no_op():
    network = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert reestimate_batchnorm(network, _images()).layers == 0


def test_batchnorm1d_syncbatchnorm_and_timm_batchnormact():
    from timm.layers import BatchNormAct2d

    net2d = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4), BatchNormAct2d(4)).eval()
    report = reestimate_batchnorm(net2d, _images())
    assert report.layers == 2
    with torch.no_grad():
        features = net2d[0](torch.cat(_images()))
    torch.testing.assert_close(net2d[1].running_mean, features.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    net1d = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    rows = [torch.randn(6, 3) for _ in range(3)]
    reestimate_batchnorm(net1d, rows)
    with torch.no_grad():
        features = net1d[0](torch.cat(rows))
    torch.testing.assert_close(net1d[1].running_var, features.var(0), atol=1e-4, rtol=1e-4)


def test_reduce_sums_over_processes():
    """``reduce`` is how DDP ranks combine their sums: two "processes" with different images end with the
    statistics of both image sets together."""
    first, second = _images(seed=1), _images(seed=2)
    network = _stem().eval()
    other = copy.deepcopy(network)
    reestimate_batchnorm(other, second)  # what the other process contributes: its own sums
    sums = {}

    def capture(tensor):
        sums["mine"] = tensor
        return tensor

    reestimate_batchnorm(copy.deepcopy(network), second, reduce=capture)
    theirs = sums["mine"]
    reestimate_batchnorm(network, first, reduce=lambda mine: mine + theirs)
    with torch.no_grad():
        features = network[0](torch.cat(first + second))
    torch.testing.assert_close(network[1].running_mean, features.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(network[1].running_var, features.var((0, 2, 3)), atol=1e-4, rtol=1e-4)


def test_group_costs_judges_every_trial_after_prepare_and_restores_the_statistics():
    network = _stem().eval()
    original = [(m.running_mean, m.running_var) for m in network.modules() if isinstance(m, nn.BatchNorm2d)]
    prepared = []

    def prepare(net):
        prepared.append(net[1].running_mean.numel())
        reestimate_batchnorm(net, _images())

    def evaluate(net):  # the score is a function of the statistics: judged on re-estimated ones
        with torch.no_grad():
            expected = net[0](torch.cat(_images())).mean((0, 2, 3))
        assert torch.allclose(net[1].running_mean, expected, atol=1e-5)
        return 0.5

    plan = [["0", True, [0, 1]], ["0", True, [2]]]
    result = group_costs(network, plan, evaluate, torch.zeros(1, 3, 8, 8), max_miou_drop=1.0, prepare=prepare)
    assert prepared == [6, 4, 5]  # the unpruned network, then each trial
    assert len(result.kept) == 2
    after = [(m.running_mean, m.running_var) for m in network.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(a[0] is b[0] and a[1] is b[1] for a, b in zip(after, original))


# ---- the protocol in a fit --------------------------------------------------------------------------------------


class Segmenter(pl.LightningModule):
    """A user module: dict batches, the network under ``seg``, one BN right after the first convolution (so the
    exact statistics are known: those of conv(all training images))."""

    def __init__(self) -> None:
        super().__init__()
        self.seg = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 3, 1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.seg(batch["image"]), batch["mask"])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self.seg(batch["image"]), batch["mask"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Scenes(Dataset):
    def __init__(self, count: int = 12, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand(count, 3, 16, 16, generator=generator) * 3
        self.masks = self.images.argmax(1)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "mask": self.masks[i]}


def _expected(module: Segmenter, dataset: Scenes) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        features = module.seg[0](dataset.images)
    return features.mean((0, 2, 3)), features.var((0, 2, 3))


class AfterStep(CompressionCallback):
    """Records, right after each step, whether the BN statistics are those of the changed network."""

    def __init__(self, dataset):
        self.dataset, self.checks, self.reports = dataset, [], []

    def on_after_compression(self, trainer, pl_module, event):
        mean, var = _expected(pl_module, self.dataset)
        bn = pl_module.seg[1]
        self.checks.append(torch.allclose(bn.running_mean, mean, atol=1e-4)
                           and torch.allclose(bn.running_var, var, atol=1e-3, rtol=1e-3))
        self.reports.append(event.batchnorm)


def _fit(tmp_path, callbacks, epochs=2, **overrides):
    dataset = Scenes()
    pl.seed_everything(0)
    module = Segmenter()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=epochs, limit_train_batches=3, callbacks=callbacks,
                                          **overrides))
    trainer.fit(module, DataLoader(dataset, batch_size=4, shuffle=True), DataLoader(Scenes(4, 1), batch_size=4))
    return module, trainer


def _pruning(**overrides):
    kwargs = dict(amount=0.4, target="channels", start_epoch=1, round_to=None, input_size=[16, 16],
                  rel_tolerance=0.5)
    return StructuredPruning(**{**kwargs, **overrides})


def test_pruning_step_reestimates_on_the_pruned_network(tmp_path):
    observer = AfterStep(Scenes())
    pruning = _pruning()
    _fit(tmp_path, [pruning, observer])
    assert observer.checks == [True]
    assert observer.reports[0].batches == 3  # bn_batches 32, at most one epoch (limit_train_batches)
    assert pruning.records[0]["bn_reestimation"]["layers"] == 1


def test_bn_batches_zero_keeps_stale_statistics(tmp_path):
    observer = AfterStep(Scenes())
    pruning = _pruning(bn_batches=0)
    _fit(tmp_path, [pruning, observer])
    assert observer.checks == [False] and observer.reports == [None]
    assert pruning.records[0]["bn_reestimation"] is None


def test_bf16_mixed_precision(tmp_path):
    observer = AfterStep(Scenes())
    module, _ = _fit(tmp_path, [_pruning(), observer], precision="bf16-mixed")
    assert observer.reports[0].batches == 3
    assert module.seg[1].running_mean.dtype == torch.float32
    assert torch.isfinite(module.seg[1].running_var).all()


class JudgedStatistics(pl.Callback):
    """Wraps the scoring function of PostPruning / the budget: checks the statistics of every judged network."""

    def __init__(self, scorer, dataset):
        self.scorer, self.dataset, self.checks = scorer, dataset, []

    def on_fit_start(self, trainer, pl_module):
        evaluate = self.scorer._evaluate

        def checked(network):
            mean, var = _expected(pl_module, self.dataset)
            self.checks.append(torch.allclose(network[1].running_mean, mean, atol=1e-4))
            return evaluate(network)

        self.scorer._evaluate = checked


def test_post_pruning_judges_reestimated_trials(tmp_path):
    post = PostPruning(max_group_miou_drop=100.0, eval_batches=1, input_size=[16, 16], bn_batches=3)
    judged = JudgedStatistics(post, Scenes())
    pruning = _pruning(global_pruning=False)
    _fit(tmp_path, [pruning, post, judged])
    assert len(judged.checks) >= 2 and all(judged.checks)  # the unpruned network and each group's trial
    assert post.steps[0]["bn_batches"] == 3


def test_budget_judges_reestimated_networks(tmp_path):
    pruning = _pruning(max_miou_drop=100.0, eval_batches=1)
    judged = JudgedStatistics(pruning, Scenes())
    _fit(tmp_path, [pruning, judged], epochs=3)
    assert len(judged.checks) == 2  # the reference before step 1, and step 1 after fine-tuning
    assert judged.checks[1]  # the judged network's statistics belong to its fine-tuned weights


class Worsening(pl.Callback):
    """Makes the budget's scorer say that the step cost everything, so that the step is undone."""

    def __init__(self, pruning):
        self.pruning = pruning

    def on_fit_start(self, trainer, pl_module):
        scores = iter([1.0, 0.0])
        self.pruning._evaluate = lambda network: next(scores)


def test_the_undo_is_reestimated(tmp_path):
    observer = AfterStep(Scenes())
    pruning = _pruning(max_miou_drop=1.0, eval_batches=1)
    module, _ = _fit(tmp_path, [pruning, Worsening(pruning), observer], epochs=3)
    assert [bool(r.get("undone")) for r in pruning.records] == [False, True]
    assert module.seg[1].running_mean.numel() == 16  # back to the unpruned width
    assert observer.checks == [True, True]  # after the step and after its undo


class Stream(IterableDataset):
    def __iter__(self):
        dataset = Scenes()
        for i in range(len(dataset)):
            yield dataset[i]


def test_an_iterable_dataset_gives_its_first_batches(tmp_path):
    observer = AfterStep(Scenes())
    dataset = Stream()
    module = Segmenter()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, limit_train_batches=2,
                                          callbacks=[_pruning(), observer]))
    trainer.fit(module, DataLoader(dataset, batch_size=4), DataLoader(Scenes(4, 1), batch_size=4))
    assert observer.reports[0].batches == 2


@pytest.mark.parametrize("factory", [StructuredPruning, PostPruning, QuantizationAwareTraining,
                                     PostTrainingQuantization, ShuntReplacement])
def test_bad_bn_batches_are_refused(factory):
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="bn_batches"):
            factory(bn_batches=bad)


def test_quantization_reestimates_the_float_network_before_preparing(tmp_path):
    seen = {}

    class BeforePrepare(CompressionCallback):
        def on_before_compression(self, trainer, pl_module, event):
            if event.kind == "quantization":
                mean, _ = _expected(pl_module, Scenes())
                seen["fresh"] = torch.allclose(pl_module.seg[1].running_mean, mean, atol=1e-4)
                seen["report"] = event.batchnorm

    # 1 epoch of momentum-0.1 training leaves stale statistics; QAT at epoch 1 measures them again first
    _fit(tmp_path, [QuantizationAwareTraining(backend="fx", start_epoch=1, input_size=[16, 16]), BeforePrepare()])
    assert seen["fresh"] and seen["report"].batches == 3


class StatisticsAtStart(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.mean = pl_module.seg[1].running_mean.clone()


def test_a_resumed_fit_keeps_the_reestimated_statistics_and_does_not_measure_again(tmp_path):
    module, trainer = _fit(tmp_path, [_pruning()])  # the step (and its re-estimation) at epoch 1
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = module.seg[1].running_mean.clone()
    observer, start = AfterStep(Scenes()), StatisticsAtStart()
    resumed = Segmenter()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, limit_train_batches=3,
                                          callbacks=[_pruning(), observer, start]))
    trainer.fit(resumed, DataLoader(Scenes(), batch_size=4), DataLoader(Scenes(4, 1), batch_size=4),
                ckpt_path=tmp_path / "last.ckpt")
    assert resumed.seg[1].running_mean.numel() == saved.numel() < 16  # the pruned architecture came back
    torch.testing.assert_close(start.mean, saved)
    assert observer.reports == []  # no step ran again, so nothing was re-estimated again
