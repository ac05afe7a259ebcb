import json

import pytest
import pytorch_lightning as pl

from lightning_segcompress import SegmentationModule
from lightning_segcompress.cli.benchmark import benchmark, main
from support.common import SMP_UNET, trainer_kwargs

SMALL_UNET = {"class_path": "segmentation_models_pytorch.Unet",
              "init_args": {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [8, 8, 8]}}


@pytest.mark.slow
def test_benchmark_checkpoint_against_a_baseline_network(tmp_path, capsys):
    module = SegmentationModule(network=SMALL_UNET, num_classes=3)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path))
    trainer.strategy.connect(module)
    ckpt = tmp_path / "small.ckpt"
    trainer.save_checkpoint(ckpt)

    main([f"--ckpt={ckpt}", f"--baseline_network={json.dumps(SMP_UNET)}", "--num_classes=3",
          "--input_size=[64,64]", "--runtimes=[eager,torchscript_lite]", "--warmup=0", "--runs=2",
          f"--output_dir={tmp_path / 'bench'}"])
    out = capsys.readouterr().out
    assert "| baseline | torchscript_lite | ok |" in out and "| model | eager | ok |" in out
    saved = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    ratios = saved["stages"]["model"]["ratios"]["torchscript_lite"]
    assert ratios["params_ratio"] > 1 and ratios["macs_ratio"] > 1  # decoder channels 32/16/8 -> 8/8/8


def test_benchmark_needs_exactly_one_model_source(tmp_path):
    with pytest.raises(ValueError, match="Give what to load"):
        benchmark(output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="Unknown runtime"):
        benchmark(network=SMALL_UNET, runtimes=["tflite"], output_dir=str(tmp_path))
