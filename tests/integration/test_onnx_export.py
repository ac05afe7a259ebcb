"""``segcompress export --runtime onnx``: a pruned user module's file matches eager in ONNX Runtime, a QAT checkpoint
becomes a QDQ file with its learned scales, a float checkpoint is quantized by ONNX Runtime, and bad input gets one
clear error with nothing half-written."""

import json
import runpy
import sys

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import nn

from lightning_segcompress.cli.export import export
from support import user_module
from support.common import REPO, trainer_kwargs

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

EXAMPLE = REPO / "examples" / "segment_image.py"
USER_MODULE = "support.user_module.UserSegmenter"
USER_DATA = {"class_path": "support.user_module.ColourScenesData", "init_args": {"batch_size": 4}}
PHOTOS = {"class_path": "lightning_segcompress.PhotoTexturesDataModule",
          "init_args": {"num_classes": 4, "image_size": [32, 32], "num_train": 64, "num_val": 16, "batch_size": 8}}
SMALL = {"class_path": "test_onnx_export.SmallSegNet", "init_args": {}}


class SmallSegNet(nn.Module):
    """Two conv-BN-ReLU (one strided) and a 1x1 classifier, upsampled back: what QAT and PTQ need, tiny."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Conv2d(16, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(self.head(self.body(x)), size=x.shape[-2:], mode="bilinear",
                                         align_corners=False)


def _run_file(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _pruned_user_checkpoint(tmp_path):
    from lightning_segcompress.callbacks import StructuredPruning

    pl.seed_everything(0)
    module = user_module.UserSegmenter()
    pruning = StructuredPruning(amount=0.5, output_dir=str(tmp_path / "pruning"))
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[pruning]))
    trainer.fit(module, *user_module.loaders())
    trainer.save_checkpoint(tmp_path / "pruned.ckpt")
    return tmp_path / "pruned.ckpt", module


@pytest.mark.slow
def test_a_pruned_user_module_exports_one_dynamic_onnx_file_that_matches_eager(tmp_path):
    ckpt, module = _pruned_user_checkpoint(tmp_path)
    params = sum(p.numel() for p in module.segmenter_net.parameters())
    assert params < sum(p.numel() for p in user_module.TinySegNet().parameters())  # it was pruned
    output = tmp_path / "ship" / "model.onnx"
    output.parent.mkdir()
    meta = export(ckpt=str(ckpt), model_class=USER_MODULE, runtime="onnx", input_size=[32, 32], output=str(output),
                  dynamic=True, data=USER_DATA, eval_batches=2, atol=1e-4, warmup=0, runs=1)
    saved = json.loads((output.parent / "model.json").read_text())
    assert saved == meta and saved["runtime"] == "onnxruntime" and saved["file"] == "model.onnx"
    assert saved["opset"] == 18 and saved["input"]["dynamic"] is True and saved["int8"] is False
    assert saved["params"] == params and saved["check"]["max_abs_diff"] <= 1e-4
    assert saved["check"]["other_shape"]["max_abs_diff"] <= 1e-4  # checked at a second batch and size too
    assert saved["accuracy"]["gap_points"] == pytest.approx(0.0, abs=1e-6)
    assert sorted(p.name for p in output.parent.iterdir()) == ["model.json", "model.onnx"]  # weights inside
    assert not onnx.load(str(output), load_external_data=False).graph.initializer[0].external_data
    # any batch and size, against the checkpoint's own network in eager
    network = module.segmenter_net.eval()
    for shape in [(1, 3, 32, 32), (3, 3, 48, 40)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            reference = network(x)
        assert (_run_file(output, x) - reference).abs().max() <= 1e-4
    # the device-side example reads model.onnx + model.json
    example = runpy.run_path(str(EXAMPLE))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(30, 45, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    example["main"]([str(output), str(tmp_path / "in.png"), "--output", str(tmp_path / "mask.png")])
    assert Image.open(tmp_path / "mask.png").size == (45, 30)


def _qdq_scales(path) -> list[float]:
    """The activation scales of the QuantizeLinear nodes of an ONNX file."""
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    constants.update({n.output[0]: numpy_helper.to_array(a.t) for n in graph.node if n.op_type == "Constant"
                      for a in n.attribute if a.name == "value"})
    return sorted(float(constants[n.input[1]]) for n in graph.node if n.op_type == "QuantizeLinear"
                  and n.input[1] in constants and constants[n.input[1]].size == 1)


@pytest.mark.slow
def test_a_qat_checkpoint_becomes_a_qdq_file_with_its_learned_scales(tmp_path):
    from lightning_segcompress import PhotoTexturesDataModule, SegmentationModule
    from lightning_segcompress.callbacks import QuantizationAwareTraining

    pl.seed_everything(0)
    module = SegmentationModule(network=SMALL, num_classes=4, lr=0.02)
    data = PhotoTexturesDataModule(**PHOTOS["init_args"])
    qat = QuantizationAwareTraining(backend="pt2e", start_epoch=1, freeze_bn_epoch=2, input_size=[32, 32])
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, limit_train_batches=8, callbacks=[qat]))
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(tmp_path / "qat.ckpt")
    output = tmp_path / "int8.onnx"
    meta = export(ckpt=str(tmp_path / "qat.ckpt"), runtime="onnx", input_size=[32, 32], output=str(output),
                  data=PHOTOS, eval_batches=2, warmup=0, runs=1)
    assert meta["int8"] is True and meta["quantization"]["backend"] == "pt2e" and meta["quantization"]["qat"]
    assert meta["accuracy"]["images"] == 16
    ops = {n.op_type for n in onnx.load(str(output)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # the scales training learned, not a re-calibration: every activation scale of the int8 graph is in the file
    learned = sorted(float(n.args[1]) for n in module.net.graph.nodes
                     if n.op == "call_function" and "quantize_per_tensor" in str(n.target)
                     and "dequantize" not in str(n.target) and isinstance(n.args[1], float))
    in_file = _qdq_scales(output)
    assert learned and all(any(abs(s - f) <= 1e-6 * max(1.0, s) for f in in_file) for s in learned)
    # the file predicts the int8 module's classes on the photographs
    data.setup("validate")
    images = torch.cat([batch[0] for batch in data.val_dataloader()])
    module.eval()
    with torch.no_grad():
        expected = module.net(images).argmax(1)
    got = torch.cat([_run_file(output, image[None]) for image in images]).argmax(1)
    assert (got == expected).float().mean() >= 0.98


@pytest.mark.slow
def test_quantize_calibrates_a_float_checkpoint_on_the_training_data(tmp_path):
    from lightning_segcompress import PhotoTexturesDataModule, SegmentationModule

    pl.seed_everything(0)
    module = SegmentationModule(network=SMALL, num_classes=4, lr=0.02)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, limit_train_batches=8))
    trainer.fit(module, datamodule=PhotoTexturesDataModule(**PHOTOS["init_args"]))
    trainer.save_checkpoint(tmp_path / "float.ckpt")
    output = tmp_path / "q.onnx"
    meta = export(ckpt=str(tmp_path / "float.ckpt"), runtime="onnx", input_size=[32, 32], output=str(output),
                  quantize=True, calibration_batches=2, data=PHOTOS, eval_batches=2, warmup=0, runs=1)
    assert meta["int8"] is True and meta["quantization"]["backend"] == "onnxruntime static (QDQ)"
    assert meta["quantization"]["calibration_batches"] == 16  # 2 training batches of 8, regrouped at batch 1
    assert meta["check"]["float_before_quantizing"]["max_abs_diff"] <= 1e-3  # the export itself is exact
    assert 0.5 < meta["check"]["argmax_agreement"] < 1  # what quantization changed, on random inputs
    assert meta["accuracy"]["images"] == 16 and abs(meta["accuracy"]["gap_points"]) < 5
    graph = onnx.load(str(output)).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)
    assert any(i.data_type == onnx.TensorProto.INT8 for i in graph.initializer)  # int8 weights in the file


def test_bad_onnx_input_gets_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    spec = {"class_path": "support.user_module.TinySegNet", "init_args": {}}
    with pytest.raises(ValueError, match="--dynamic is for --runtime onnx"):
        export(network=spec, runtime="executorch", dynamic=True, output=str(tmp_path / "m.pte"))
    with pytest.raises(ValueError, match="--quantize calibrates on training images: give --data"):
        export(network=spec, runtime="onnx", quantize=True, output=str(tmp_path / "m.onnx"))
    with pytest.raises(ValueError, match=r"does not match runtime onnxruntime.*\.onnx"):
        export(network=spec, runtime="onnx", output=str(tmp_path / "m.pte"))
    with pytest.raises(FileNotFoundError, match="the folder .*missing does not exist; create it"):
        export(network=spec, runtime="onnx", output=str(tmp_path / "missing" / "m.onnx"))
    (tmp_path / "taken.onnx").write_text("keep me")
    with pytest.raises(FileExistsError, match="exists; pass --overwrite true"):
        export(network=spec, runtime="onnx", output=str(tmp_path / "taken.onnx"))
    assert (tmp_path / "taken.onnx").read_text() == "keep me"
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if not __import__("os").access(read_only, __import__("os").W_OK):  # root can write anywhere
            with pytest.raises(PermissionError, match="is not writable"):
                export(network=spec, runtime="onnx", output=str(read_only / "m.onnx"))
    finally:
        read_only.chmod(0o755)
    # an operator the exporter cannot handle: the error names it, nothing is written
    with pytest.raises(Exception, match=r"onnxruntime export failed: .*Fix:"):
        export(network={"class_path": "test_onnx_export.Unexportable", "init_args": {}}, runtime="onnx",
               input_size=[16, 16], output=str(tmp_path / "u.onnx"), warmup=0, runs=1)
    # onnxruntime missing: one error naming the extra
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install 'lightning-segcompress\[onnx\]'"):
        export(network=spec, runtime="onnx", output=str(tmp_path / "m.onnx"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ro", "taken.onnx"]


class Unexportable(nn.Module):
    """A forward that leaves the tensor world (``.tolist()`` of the input): no graph exporter can follow it."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = float(x.abs().max().tolist())
        return self.conv(x) * (scale if scale > 1 else 1.0)
