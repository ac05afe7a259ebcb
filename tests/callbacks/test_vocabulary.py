"""One vocabulary across the callbacks: the renamed arguments (old spellings warn for one release and mean the same),
the stored hyperparameters under the new names, and ``input_size=None`` = the size of the fit's training batches."""

import random
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_segcompress.callbacks import (
    DeviceBenchmark,
    KnowledgeDistillation,
    PostPruning,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    ShuntReplacement,
    SparsityRegularization,
    StructuredPruning,
    _input_size,
)
from lightning_segcompress.models import build_network
from lightning_segcompress.quantization import QuantizationError, quantization_stage
from support.common import SMP_DEEPLAB, trainer_kwargs
from support.user_module import TinySegNet

SIZE = [32, 48]  # the batches' [H, W]: not square, and not the 64x64 fallback


class Scenes(Dataset):
    """``(image, mask)`` pairs of ``SIZE``; the label is the strongest colour channel."""

    def __init__(self, count: int, seed: int) -> None:
        self.images = torch.rand(count, 3, *SIZE, generator=torch.Generator().manual_seed(seed))
        self.masks = self.images.argmax(1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.masks[index]


class Tiny(pl.LightningModule):
    def __init__(self, net=None) -> None:
        super().__init__()
        self.net = net if net is not None else TinySegNet()

    def forward(self, images):
        return self.net(images)

    def training_step(self, batch, batch_idx):
        images, masks = batch
        return F.cross_entropy(self.net(images), masks)

    def validation_step(self, batch, batch_idx):
        images, masks = batch
        self.log("val_loss", F.cross_entropy(self.net(images), masks))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loaders(generator=None):
    return (DataLoader(Scenes(4, seed=0), batch_size=2, shuffle=True, generator=generator),
            DataLoader(Scenes(2, seed=1), batch_size=2))


def _fit(tmp_path, callbacks, module=None, loaders=None, **overrides):
    pl.seed_everything(0)
    module = module if module is not None else Tiny()
    kwargs = {"max_epochs": 1, "limit_train_batches": 1, "num_sanity_val_steps": 0, **overrides}
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **kwargs))
    trainer.fit(module, *(loaders or _loaders()))
    return module


# ---- renamed arguments ---------------------------------------------------------------------------------------------

SHUNT = {"blocks": [4, 5]}  # the default blocks="auto" needs a target
RENAMED = [  # (callback, other arguments, old spelling, new name, value, another value, what the callback reads)
    (PostPruning, {}, "max_miou_drop", "max_group_miou_drop", 1.5, 3.0, lambda c: c.max_group_miou_drop),
    (PostPruning, {}, "tolerance", "max_group_miou_drop", 1.5, 3.0, lambda c: c.max_group_miou_drop),
    (PostPruning, {}, "report_dir", "output_dir", "out", "other", lambda c: c.output_dir),
    (QuantizationAwareTraining, {}, "keep_float", "ignored_layers", ["head"], ["body"], lambda c: c.ignored_patterns),
    (PostTrainingQuantization, {}, "keep_float", "ignored_layers", ["head"], ["body"], lambda c: c.ignored_patterns),
    (StructuredPruning, {}, "tolerance", "rel_tolerance", 0.1, 0.2, lambda c: c.rel_tolerance),
    (DeviceBenchmark, {}, "tolerance", "atol", 0.01, 0.02, lambda c: c.settings.tolerance),
    (ShuntReplacement, SHUNT, "kq_batches", "eval_batches", 3, 4, lambda c: c.eval_batches),
]


@pytest.mark.parametrize("cls, kwargs, old, new, value, other, read", RENAMED,
                         ids=[f"{case[0].__name__}-{case[2]}" for case in RENAMED])
def test_an_old_spelling_warns_and_means_the_same_as_the_new_name(cls, kwargs, old, new, value, other, read):
    with pytest.warns(FutureWarning, match=rf"{cls.__name__}\({old}=\.\.\.\) is deprecated .* use {new}=\.\.\."):
        from_old = cls(**kwargs, **{old: value})
    from_new = cls(**kwargs, **{new: value})
    assert read(from_old) == read(from_new) == value
    assert from_old.hyperparameters() == from_new.hyperparameters(), "stored under the new name only"
    assert from_old.hyperparameters()[new] == value and old not in from_old.hyperparameters()
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=rf"got both {old}=.* \(deprecated\) and {new}="):
        cls(**kwargs, **{old: value, new: other})


def test_the_stored_hyperparameters_use_the_new_names():
    expected = {PostPruning: ("max_group_miou_drop", {"max_miou_drop", "tolerance", "report_dir"}),
                QuantizationAwareTraining: ("ignored_layers", {"keep_float"}),
                PostTrainingQuantization: ("ignored_layers", {"keep_float"}),
                StructuredPruning: ("rel_tolerance", {"tolerance"}),
                DeviceBenchmark: ("atol", {"tolerance"}),
                ShuntReplacement: ("eval_batches", {"kq_batches", "report_dir"})}
    for cls, (new, old) in expected.items():
        stored = cls(**(SHUNT if cls is ShuntReplacement else {})).hyperparameters()
        assert new in stored and not old & set(stored), cls.__name__
    assert PostPruning().hyperparameters()["max_group_miou_drop"] == 0.5, "the same default, in mIoU points"
    assert StructuredPruning(max_miou_drop=1.0).hyperparameters()["max_miou_drop"] == 1.0, "the budget keeps its name"


def test_old_attribute_names_and_errors_speak_the_spelling_given():
    post = PostPruning(max_group_miou_drop=2.0)
    with pytest.warns(FutureWarning, match=r"PostPruning.max_miou_drop is deprecated"):
        assert post.max_miou_drop == 2.0
    qat = QuantizationAwareTraining(backend="fx", ignored_layers=["head"])
    with pytest.warns(FutureWarning, match=r"keep_float_patterns is deprecated"):
        assert qat.keep_float_patterns == ["head"]
    with pytest.raises(ValueError, match=r"^max_group_miou_drop is the mIoU points one pruned group may cost"):
        PostPruning(max_group_miou_drop=-1.0)
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=r"^max_miou_drop is the mIoU points"):
        PostPruning(max_miou_drop=-1.0)
    module = Tiny()
    for argument in ("ignored_layers", "keep_float"):
        callback = QuantizationAwareTraining(backend="fx", **{argument: ["nope"]})
        with pytest.raises(QuantizationError, match=rf"^{argument} \['nope'\] match no layer"):
            callback.setup(None, module, "fit")


def test_ignored_layers_are_left_in_float_by_either_spelling():
    module = Tiny()
    new = QuantizationAwareTraining(backend="fx", ignored_layers=[r"head\.0"])
    with pytest.warns(FutureWarning):
        old = QuantizationAwareTraining(backend="fx", keep_float=[r"head\.0"])
    for callback in (new, old):
        callback.setup(None, module, "fit")
        callback.teardown(None, module, "fit")
    assert new.config.keep_float == old.config.keep_float == ("head.0",)


def test_a_checkpoint_written_before_the_rename_resumes_without_a_changed_hyperparameter():
    post = PostPruning(max_group_miou_drop=0.5)
    steps = [{"epoch": 1, "step": 1, "baseline_miou": 0.5, "bn_batches": 8, "groups": []}]
    old_state = {"hyperparameters": {"max_miou_drop": 0.5, "eval_batches": 8, "ignore_index": 255,
                                     "input_size": None, "output_dir": None, "network_attribute": None,
                                     "bn_batches": 8}, "steps": steps}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        post.load_state_dict(old_state)
    assert post.steps == steps


# ---- input_size=None: the size of the fit's training batches ---------------------------------------------------------

def test_the_defaults_are_the_batches_size_but_device_benchmark_keeps_its_deployment_size():
    for cls in (PostPruning, KnowledgeDistillation, SparsityRegularization, StructuredPruning):
        assert cls().input_size is None, cls.__name__
    assert ShuntReplacement(**SHUNT).input_size is None
    assert QuantizationAwareTraining().input_size is None and PostTrainingQuantization().input_size is None
    assert DeviceBenchmark().settings.input_shape == (1, 3, 512, 512)
    assert QuantizationAwareTraining(input_size=[16, 24]).config.example_shape == (2, 3, 16, 24), "as given"


def test_pruning_and_post_pruning_take_the_batches_size(tmp_path):
    pruning = StructuredPruning(amount=0.3, target="channels", round_to=None, rel_tolerance=0.5, bn_batches=0)
    post = PostPruning(max_group_miou_drop=100.0, eval_batches=1, bn_batches=0)
    _fit(tmp_path, [pruning, post])
    assert pruning.input_size == SIZE and post.input_size == SIZE
    assert len(post.steps) == 1 and post.steps[0]["groups"], "the groups were tried on a 32x48 example"


def test_sparsity_budget_costs_at_the_batches_size(tmp_path):
    from_batches = SparsityRegularization(method="budget", strength=1e-3)
    given = SparsityRegularization(method="budget", strength=1e-3, input_size=SIZE)
    _fit(tmp_path / "none", [from_batches])
    _fit(tmp_path / "given", [given])
    assert from_batches.input_size == SIZE
    assert from_batches.strengths.keys() == given.strengths.keys() and from_batches.strengths
    for name, strength in given.strengths.items():
        torch.testing.assert_close(from_batches.strengths[name], strength)


def test_distillation_checks_at_the_batches_size(tmp_path):
    distillation = KnowledgeDistillation(teacher="snapshot", hints=[{"student": "body.3", "teacher": "body.3"}])
    _fit(tmp_path, [distillation])
    assert distillation.input_size == SIZE


@pytest.mark.parametrize("callback", [lambda: QuantizationAwareTraining(backend="fx", start_epoch=0),
                                      lambda: PostTrainingQuantization(backend="fx", calibration_batches=1)],
                         ids=["qat", "ptq"])
def test_quantization_traces_at_the_batches_size(tmp_path, callback):
    quantization = callback()
    module = _fit(tmp_path, [quantization])
    assert quantization.input_size == SIZE
    assert quantization.config.example_shape == (2, 3, *SIZE)
    assert quantization_stage(module.net)["config"]["example_shape"] == [2, 3, *SIZE], "what a checkpoint restores"


def test_device_benchmark_with_none_measures_at_the_batches_size(tmp_path):
    benchmark = DeviceBenchmark(input_size=None, runtimes=["eager"], warmup=0, runs=1, isolate=False, memory=False,
                                report=False, eval_batches=1, profile=False, exported_miou=False, on_fit_end=False,
                                per_technique=False)
    _fit(tmp_path, [benchmark])
    assert benchmark.settings.input_shape == (1, 3, *SIZE)
    assert benchmark.hyperparameters()["input_size"] is None, "stored as given"


def test_shunt_maps_the_blocks_at_the_batches_size(tmp_path):
    torch.manual_seed(0)
    shunt = ShuntReplacement(blocks=[4, 5], stage_a_epochs=1, eval_batches=1, bn_batches=0)
    _fit(tmp_path, [shunt], module=Tiny(build_network(SMP_DEEPLAB, num_classes=3)))
    assert shunt.input_size == SIZE
    assert tuple(shunt.block_map[0].in_shape[-2:]) == (SIZE[0] // 2, SIZE[1] // 2), "the stem halves 32x48"


def test_reading_the_size_leaves_the_training_draws_alone(tmp_path):
    seen = {}

    class Probe(pl.Callback):
        def __init__(self, read):
            self.read = read

        def setup(self, trainer, pl_module, stage):
            states = torch.get_rng_state(), random.getstate()
            if self.read:
                seen["size"] = _input_size.training_input_size(trainer, pl_module, "Probe")
                seen["same"] = torch.equal(states[0], torch.get_rng_state()) and states[1] == random.getstate()

    weights = []
    for read in (True, False):  # shuffled batches from the loader's own generator, dropout-free training
        module = _fit(tmp_path / str(read), [Probe(read)], loaders=_loaders(torch.Generator().manual_seed(5)),
                      max_epochs=2, limit_train_batches=2)
        weights.append(torch.cat([p.detach().flatten() for p in module.parameters()]))
    assert seen == {"size": SIZE, "same": True}
    assert torch.equal(*weights), "the fit trained on the same batches, in the same order"


def test_without_training_data_the_old_default_is_used_and_said(tmp_path, monkeypatch):
    said = []
    monkeypatch.setattr(_input_size, "rank_zero_info", said.append)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path))
    assert _input_size.training_input_size(trainer, Tiny(), "PostPruning") == [64, 64]
    assert _input_size.training_input_size(trainer, Tiny(), "DeviceBenchmark", default=(512, 512)) == [512, 512]
    assert "PostPruning: input_size=None is the [H, W] of the fit's training batches, but the fit has no training " \
           "data; using input_size=[64, 64]" in said[0]
