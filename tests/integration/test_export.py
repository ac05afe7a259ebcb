"""``segcompress export``: the deployable bundle (exported file + model.json), int8 for quantization-prepared
checkpoints, the val mIoU and latency of the file itself, the device-side example script, errors, a fast --help."""

import copy
import json
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lightning_segcompress.cli.export import export, main
from lightning_segcompress.export import ExportError, write_bundle
from support.common import REPO

EXAMPLE = REPO / "examples" / "segment_image.py"
TINY = {"class_path": "test_export.TinySegNet", "init_args": {}}
SYNTHETIC = {"class_path": "lightning_segcompress.SyntheticScenesDataModule",
             "init_args": {"num_classes": 3, "image_size": [32, 32], "num_val": 4, "batch_size": 2, "num_train": 4,
                           "num_test": 2}}


class TinySegNet(nn.Module):
    """conv-BN-ReLU (stride 2), conv, upsample: logits at the input's size (seeded weights)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, num_classes, 1)
        with torch.no_grad():
            self.stem[1].running_mean.uniform_(-0.5, 0.5)
            self.stem[1].running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(self.head(self.stem(x)), size=x.shape[-2:], mode="bilinear",
                                         align_corners=False)


@pytest.fixture(scope="module")
def example():
    return runpy.run_path(str(EXAMPLE))


def _eager(network, shape, seed=1):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, network.eval()(x)


def _png(path, size=(45, 30)):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_executorch_bundle_reproduces_eager_and_the_example_writes_a_colour_mask(tmp_path, example):
    pytest.importorskip("executorch")
    output = tmp_path / "out" / "model.pte"
    output.parent.mkdir()
    meta = main([f"--network={json.dumps(TINY)}", "--num_classes=3", "--runtime=executorch", "--input_size", "32",
                 "48", f"--output={output}", "--warmup=1", "--runs=2", "--class_names=[sky,road,car]"])
    saved = json.loads((tmp_path / "out" / "model.json").read_text())
    assert saved == meta and output.is_file() and saved["file"] == "model.pte"
    assert saved["size_bytes"] == output.stat().st_size
    assert saved["input_size"] == [32, 48] and saved["num_classes"] == 3 and saved["class_names"] == ["sky", "road",
                                                                                                       "car"]
    assert saved["runtime"] == "executorch" and saved["int8"] is False and saved["quantization"] is None
    assert saved["params"] == sum(p.numel() for p in TinySegNet().parameters()) and saved["macs"] > 0
    assert saved["latency"]["median_ms"] > 0 and saved["accuracy"] is None
    assert saved["normalization"]["mean"] == [0.485, 0.456, 0.406] and "ImageNet" in saved["normalization"]["source"]
    assert saved["versions"]["torch"] == torch.__version__ and saved["versions"]["executorch"]
    assert sorted(p.name for p in output.parent.iterdir()) == ["model.json", "model.pte"]  # no leftovers
    # the file, run the way the device side runs it, gives eager's logits
    x, reference = _eager(TinySegNet(), (1, 3, 32, 48))
    logits = example["load_model"](output)(x.numpy())
    assert np.abs(logits - reference.numpy()).max() <= 1e-3
    # the example script (imported: a second process would import executorch again, ~15 s here) on an image of
    # another size: a colour PNG of that size, coloured by the palette
    image = _png(tmp_path / "photo.png")
    example["main"]([str(output), str(image), "--output", str(tmp_path / "mask.png"), "--classes_out",
                     str(tmp_path / "classes.png")])
    mask = Image.open(tmp_path / "mask.png")
    assert mask.mode == "RGB" and mask.size == (45, 30)
    classes = np.asarray(Image.open(tmp_path / "classes.png"))
    assert classes.shape == (30, 45) and classes.max() < 3
    colours = example["palette"](3)
    assert (np.asarray(mask) == colours[classes]).all()


def test_lite_bundle_with_data_records_the_files_miou_latency_and_the_datas_normalization(tmp_path, example):
    output = tmp_path / "model.ptl"
    meta = export(network=TINY, num_classes=3, runtime="torchscript_lite", input_size=[32, 32], output=str(output),
                  data=SYNTHETIC, eval_batches=2, warmup=1, runs=2)
    saved = json.loads((tmp_path / "model.json").read_text())
    assert saved == meta and saved["runtime"] == "torchscript_lite" and saved["file"] == "model.ptl"
    accuracy = saved["accuracy"]
    assert accuracy["images"] == 4 and 0 <= accuracy["val_miou"] <= 1
    assert abs(accuracy["val_miou"] - accuracy["eager_val_miou"]) < 1e-6
    assert saved["latency"]["median_ms"] > 0 and saved["latency"]["threads"] >= 1
    assert saved["normalization"]["source"] == "SyntheticScenesDataModule.eval_transform()"
    assert saved["class_names"] == ["class_0", "class_1", "class_2"]
    x, reference = _eager(TinySegNet(), (1, 3, 32, 32))
    assert np.abs(example["load_model"](output)(x.numpy()) - reference.numpy()).max() <= 1e-3
    # the example script as the device side runs it: its own process, no lightning_segcompress
    image = _png(tmp_path / "in.png", (20, 24))
    result = subprocess.run([sys.executable, "-c", "import runpy, sys; sys.modules['lightning_segcompress'] = None; "
                             f"sys.argv = sys.argv[1:]; runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')",
                             str(EXAMPLE), str(output), str(image), "--output", str(tmp_path / "m.png")],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    mask = Image.open(tmp_path / "m.png")
    assert mask.mode == "RGB" and mask.size == (20, 24)


def _ptq_checkpoint(tmp_path):
    """A SegmentationModule checkpoint whose network is FX-PTQ prepared and calibrated (not converted)."""
    from lightning_segcompress import SegmentationModule
    from lightning_segcompress.quantization import QuantizationConfig, calibrate, prepare_network

    module = SegmentationModule(network=TINY, num_classes=3)
    prepared = prepare_network(module.net, QuantizationConfig(backend="fx", qat=False, example_shape=(2, 3, 32, 32)))
    calibrate(prepared, [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    module.net = prepared
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "ptq.ckpt")
    return tmp_path / "ptq.ckpt"


def test_a_quantization_prepared_checkpoint_exports_int8_without_touching_the_loaded_network(tmp_path, example):
    from lightning_segcompress.models.loading import load_network
    from lightning_segcompress.quantization import convert_network, quantization_stage
    from lightning_segcompress.state import carry_stages
    from lightning_segcompress.utils.inspection import has_int8_modules

    network = load_network(ckpt=str(_ptq_checkpoint(tmp_path))).eval()
    assert quantization_stage(network)["converted"] is False
    before = copy.deepcopy(network.state_dict())
    output = tmp_path / "int8" / "model.ptl"
    meta = write_bundle(network, "torchscript_lite", [32, 32], output, warmup=1, runs=2, isolate=False)
    assert meta["int8"] is True and meta["quantization"] == {"backend": "fx", "qat": False, "converted_here": True}
    assert json.loads((tmp_path / "int8" / "model.json").read_text())["int8"] is True
    assert [s["kind"] for s in meta["compression_stages"]] == ["quantization"]
    assert meta["compression_stages"][-1]["converted"] is True
    # the user's network: still the prepared (fake-quant) one, same state
    assert quantization_stage(network)["converted"] is False and not has_int8_modules(network)
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    # the file computes what the int8 conversion computes
    copied = copy.deepcopy(network)
    carry_stages(network, copied)  # a GraphModule's deep copy drops the stages
    x, reference = _eager(convert_network(copied), (1, 3, 32, 32))
    logits = torch.from_numpy(example["load_model"](output)(x.numpy()))
    assert (logits.argmax(1) == reference.argmax(1)).float().mean() > 0.99
    assert torch.allclose(logits, reference, atol=1e-3)


def test_errors_name_the_cause_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"does not match runtime executorch.*\.pte"):
        export(network=TINY, runtime="executorch", output=str(tmp_path / "model.ptl"))
    with pytest.raises(ValueError, match=r"does not match runtime torchscript_lite.*\.ptl"):
        export(network=TINY, runtime="torchscript_lite", output=str(tmp_path / "model.pte"))
    with pytest.raises(ValueError, match="Unknown runtime 'tflite'"):
        export(network=TINY, runtime="tflite")
    with pytest.raises(ValueError, match="Give what to load"):
        export(output=str(tmp_path / "model.pte"))
    with pytest.raises(ValueError, match="3 class names given but the network predicts 2"):
        write_bundle(TinySegNet(2), "torchscript_lite", [16, 16], tmp_path / "m.ptl", class_names=["a", "b", "c"],
                     warmup=0, runs=1, isolate=False)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_a_failed_output_check_raises_and_writes_nothing(tmp_path):
    class Unstable(TinySegNet):  # a different output on every call: the exported file cannot reproduce it
        def forward(self, x):
            return super().forward(x) + torch.rand(1)

    with pytest.raises(ExportError, match=r"torchscript_lite export failed: .*differs from eager.*Fix:"):
        write_bundle(Unstable(), "torchscript_lite", [16, 16], tmp_path / "m.ptl", warmup=0, runs=1, isolate=False)
    assert list(tmp_path.iterdir()) == []


def test_help_does_not_import_torch():
    code = ("import sys\nfrom lightning_segcompress.cli.export import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported'\n"
            "assert 'pytorch_lightning' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    for argument in ("--ckpt", "--runtime", "--input_size", "--data", "--class_names", "--atol"):
        assert argument in result.stdout


def test_device_benchmark_save_artifact_writes_the_final_bundle_from_its_own_measurements(tmp_path, example):
    import pytorch_lightning as pl

    from lightning_segcompress import SegmentationModule, SyntheticScenesDataModule
    from lightning_segcompress.callbacks import DeviceBenchmark
    from support.common import trainer_kwargs

    with pytest.raises(ValueError, match="save_artifact needs an exported runtime"):
        DeviceBenchmark(runtimes=["eager"], save_artifact=True)
    data = SyntheticScenesDataModule(**SYNTHETIC["init_args"])
    data.class_names = ("sky", "ground", "thing")
    bench = DeviceBenchmark(input_size=[32, 32], runtimes=["eager", "torchscript_lite", "onnx"], warmup=0, runs=1,
                            isolate=False, memory=False, profile=False, report=False, on_fit_start=False,
                            per_technique=False, save_artifact=True, output_dir=str(tmp_path / "bench"))
    module = SegmentationModule(network=TINY, num_classes=3)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[bench], limit_train_batches=1)).fit(module, datamodule=data)
    folder = tmp_path / "bench" / "artifact" / "torchscript_lite"
    meta = json.loads((folder / "model.json").read_text())
    final = bench.stages["final"]["report"]["runtimes"]["torchscript_lite"]
    assert meta["latency"]["median_ms"] == final["median_ms"]  # reused, not measured again
    assert meta["class_names"] == ["sky", "ground", "thing"] and meta["input_size"] == [32, 32]
    assert meta["accuracy"]["val_miou"] == final["accuracy"]["miou"] and meta["int8"] is False
    assert meta["normalization"]["source"] == "SyntheticScenesDataModule.eval_transform()"
    x, reference = _eager(module.net, (1, 3, 32, 32))
    assert np.abs(example["load_model"](folder / "model.ptl")(x.numpy()) - reference.numpy()).max() <= 1e-3
    # ONNX Runtime through the same callback: its bundle next to lite's, the file's mIoU measured in its worker
    onnx_meta = json.loads((tmp_path / "bench" / "artifact" / "onnxruntime" / "model.json").read_text())
    onnx_final = bench.stages["final"]["report"]["runtimes"]["onnxruntime"]
    assert onnx_meta["file"] == "model.onnx" and onnx_meta["opset"] == 18
    assert onnx_meta["accuracy"]["val_miou"] == onnx_final["accuracy"]["miou"] == final["accuracy"]["miou"]
    onnx_file = tmp_path / "bench" / "artifact" / "onnxruntime" / "model.onnx"
    assert np.abs(example["load_model"](onnx_file)(x.numpy()) - reference.numpy()).max() <= 1e-3
