"""``segcompress export``: from a trained (compressed) checkpoint to the file to ship (``.pte`` / ``.ptl`` /
``.onnx``) and its ``model.json``.

Only the standard library is imported at module level: torch, Lightning and the package's heavy modules are imported
inside :func:`export`, so that ``segcompress export --help`` answers at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

RUNTIMES = ("executorch", "torchscript_lite", "onnxruntime", "onnx")  # "onnx" is onnxruntime's alias


def export(
    ckpt: str | None = None,
    network: dict[str, Any] | None = None,
    recipe: str | None = None,
    model_class: str | None = None,
    network_attribute: str | None = None,
    num_classes: int | None = 6,
    runtime: str = "executorch",
    input_size: list[int] = (512, 512),
    batch_size: int = 1,
    output: str | None = None,
    data: dict[str, Any] | None = None,
    eval_batches: int = 8,
    class_names: list[str] | None = None,
    threads: int | None = None,
    warmup: int = 3,
    runs: int = 10,
    atol: float = 1e-3,
    int8_agreement: float = 0.85,
    dynamic: bool = False,
    quantize: bool = False,
    calibration_batches: int = 8,
    opset: int = 18,
    overwrite: bool = False,
) -> dict:
    """Write the file to ship (ExecuTorch ``.pte``, TorchScript lite ``.ptl`` or ONNX ``.onnx``) and ``model.json``
    next to it.

    ``model.json`` (same stem as the file) holds the class count and names, the input size, the normalization, the
    compression stages, params and MACs, whether the file is int8, its size, the runtime and versions, the latency
    measured here and, with ``--data``, the val mIoU of the exported file itself next to eager's on the same
    images. A QAT / PTQ checkpoint whose network is still the fake-quant one is exported as int8 (converted on a
    copy). The exported file's output is checked against eager; a failure writes nothing.

    Args:
        ckpt: Lightning checkpoint to export (compressed ones too: their stages are replayed).
        network: network spec ``{"class_path": ..., "init_args": {...}}`` (random weights), instead of ``ckpt``.
        recipe: ``segcompress`` YAML config whose ``model:`` builds the LightningModule of ``ckpt`` (or, alone,
            the network with random weights).
        model_class: LightningModule class of ``ckpt`` when no recipe is given, built from its stored
            hyperparameters (default: the class LightningCLI recorded in it, else
            ``lightning_segcompress.SegmentationModule``).
        network_attribute: attribute path of the network in the LightningModule (default: found automatically).
        num_classes: classes of a ``network`` spec.
        runtime: ``executorch`` (``.pte``, XNNPACK), ``torchscript_lite`` (``.ptl``, PyTorch Mobile lite
            interpreter) or ``onnx`` (``.onnx``, one self-contained file from torch.onnx's dynamo exporter, checked
            and timed in ONNX Runtime; needs ``pip install 'lightning-segcompress[onnx]'``). A QAT / PTQ
            checkpoint (backend pt2e) becomes a QDQ ONNX file with the scales and zero points it learned.
        input_size: ``[H, W]`` of the exported (static) input, e.g. ``--input_size 512 512``.
        batch_size: batch size of the exported input.
        output: the file to write; default ``model.pte`` (executorch) or ``model.ptl`` (torchscript_lite); its
            suffix must match the runtime. ``model.json`` goes next to it.
        data: LightningDataModule spec ``{"class_path": ..., "init_args": {...}}``: score the exported file's val
            mIoU on its first ``eval_batches`` validation batches, and take the normalization (and class names,
            where it has ``class_names``) from it.
        eval_batches: validation batches scored with ``--data``.
        class_names: class names for ``model.json`` (default: the data module's, else ``class_0`` ...).
        threads: CPU threads for timing the file here (default: torch's).
        warmup: untimed runs of the file before timing.
        runs: timed runs of the file (the median is recorded).
        atol: largest accepted absolute difference between the file's output and eager's (int8 files: at least
            ``int8_agreement`` of the pixels must get eager's class instead).
        int8_agreement: least share of pixels on which an int8 file must predict the class the int8 network predicts
            in eager (a broken export agrees on about 1 / classes).
        dynamic: (onnx) batch, height and width symbolic where the network allows it (checked on a second shape).
        quantize: (onnx) quantize a float checkpoint with ONNX Runtime's static quantization (QDQ, per-channel s8
            weights, u8 activations), calibrated on ``calibration_batches`` training batches of ``--data``.
        calibration_batches: training batches of ``--data`` that calibrate ``--quantize``.
        opset: (onnx) the ONNX opset written (recorded in ``model.json``).
        overwrite: replace an existing ``output`` (default: refuse it).

    Returns:
        The content of ``model.json``.
    """
    import os

    if runtime not in RUNTIMES:
        raise ValueError(f"Unknown runtime {runtime!r}; choose --runtime executorch (.pte), torchscript_lite (.ptl) "
                         "or onnx (.onnx).")
    if eval_batches < 1:
        raise ValueError(f"eval_batches must be >= 1, got {eval_batches}.")
    onnx = runtime in ("onnx", "onnxruntime")
    for flag, value in (("dynamic", dynamic), ("quantize", quantize)):
        if value and not onnx:
            raise ValueError(f"--{flag} is for --runtime onnx; {runtime} files have a static input.")
    if quantize and data is None:
        raise ValueError("--quantize calibrates on training images: give --data (a LightningDataModule spec).")
    if calibration_batches < 1:
        raise ValueError(f"calibration_batches must be >= 1, got {calibration_batches}.")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lightning_segcompress.export.bundle import check_output_path, metadata_path, write_bundle

    output_path = check_output_path(runtime, output)
    check_destination(output_path, overwrite)
    if onnx:
        from lightning_segcompress.benchmark.runtimes import get_runtime

        available, reason = get_runtime("onnxruntime").available()
        if not available:
            raise ImportError(f"--runtime onnx needs the [onnx] extra: {reason}")
    from lightning_segcompress.models.loading import load_network

    model = load_network(ckpt=ckpt, network=network, recipe=recipe, model_class=model_class,
                         num_classes=num_classes, network_attribute=network_attribute).eval()
    from lightning_segcompress.export.bundle import IMAGENET_NORMALIZATION

    evaluation, data_class_names = None, None
    normalization = {**IMAGENET_NORMALIZATION, "source": "ImageNet defaults (no --data given)"}
    if data is not None:
        evaluation, normalization, data_class_names = _from_data(data, eval_batches, input_size, batch_size)
    export_options = {"opset": opset, "dynamic": dynamic} if onnx else {}
    if quantize:
        from lightning_segcompress.models.loading import load_training_images

        export_options["calibration"] = load_training_images(data, calibration_batches, input_size, batch_size)
    metadata = write_bundle(model, runtime, input_size, output_path, batch_size=batch_size,
                            class_names=class_names if class_names is not None else data_class_names,
                            normalization=normalization, evaluation=evaluation, threads=threads, warmup=warmup,
                            runs=runs, atol=atol, int8_agreement=int8_agreement, export_options=export_options)
    print(summary(metadata, output_path, metadata_path(output_path)))
    return metadata


def check_destination(output, overwrite: bool) -> None:
    """Refuse, before anything slow, an output whose folder is missing or not writable, or (without
    ``overwrite``) that exists."""
    import os
    from pathlib import Path

    output = Path(output)
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"--output {output}: the folder {folder} does not exist; create it (mkdir -p "
                                f"{folder}) or choose another --output.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"--output {output}: the folder {folder} is not writable; choose another --output.")
    if output.exists() and not overwrite:
        raise FileExistsError(f"--output {output} exists; pass --overwrite true to replace it, or choose another "
                              "--output.")


def summary(metadata: dict, output, json_path) -> str:
    """A few lines about the written bundle."""
    latency = metadata.get("latency") or {}
    lines = [f"written: {output} ({metadata['size_bytes'] / 1e6:.2f} MB, {metadata['runtime']}, "
             f"{'int8' if metadata['int8'] else 'float32'}) and {json_path}",
             f"input {metadata['input']['batch_size']}x{metadata['input']['channels']}x"
             f"{'x'.join(str(s) for s in metadata['input_size'])}, {metadata['num_classes']} classes"]
    if latency.get("median_ms") is not None:
        lines.append(f"latency here: {latency['median_ms']:.2f} ms median ({latency['threads']} threads)")
    accuracy = metadata.get("accuracy") or {}
    if accuracy.get("val_miou") is not None:
        lines.append(f"val mIoU of the file: {accuracy['val_miou']:.4f} (eager {accuracy['eager_val_miou']:.4f}, "
                     f"{accuracy['images']} images)")
    elif accuracy.get("error"):
        lines.append(f"val mIoU not measured: {accuracy['error']}")
    return "\n".join(lines)


def _from_data(spec: dict[str, Any], eval_batches: int, input_size: Sequence[int], batch_size: int):
    """The EvalSet of ``eval_batches`` validation batches of the data module ``spec``, its normalization and its
    class names (None where it has none)."""
    from lightning_segcompress.benchmark.accuracy import EvalSet
    from lightning_segcompress.export.bundle import data_normalization
    from lightning_segcompress.models.loading import load_validation_batches
    from lightning_segcompress.utils.shapes import input_shape

    datamodule, batches = load_validation_batches(spec, eval_batches)
    ignore_index = getattr(datamodule, "ignore_index", 255)
    evaluation = EvalSet.from_batches(batches, input_shape(input_size, batch_size), ignore_index)
    names = getattr(datamodule, "class_names", None)
    return evaluation, data_normalization(datamodule), list(names) if names is not None else None


def main(args: list[str] | None = None):
    """``segcompress export``."""
    from lightning_segcompress.cli.tools import run_tool

    return run_tool(export, args, prog="segcompress export")


if __name__ == "__main__":
    main()
