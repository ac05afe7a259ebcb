"""The deployable bundle: one exported file (``.pte`` / ``.ptl``) and ``model.json`` next to it (same stem) with what
the device side needs to run it (input size, normalization, classes) and what was measured on it here.

Pure torch (no Lightning import). The export, the output check against eager, the timing in an isolated worker and
the exported file's val mIoU are :func:`~lightning_segcompress.benchmark.runner.benchmark_network`'s; this module
converts a quantization-prepared (fake-quant) network to int8 first (on a CPU copy), runs it for one runtime, and
writes the two files atomically (temporary names, renamed at the end: nothing half-written on failure).
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["BUNDLE_VERSION", "ExportError", "IMAGENET_NORMALIZATION", "RUNTIME_SUFFIXES", "bundle_from_report",
           "check_output_path", "data_normalization", "default_class_names", "metadata_path", "network_to_export",
           "write_bundle"]

BUNDLE_VERSION = 1

def _suffixes() -> dict[str, str]:
    from lightning_segcompress.benchmark.runtimes import file_runtimes, get_runtime

    return {name: get_runtime(name).suffix for name in file_runtimes()}


RUNTIME_SUFFIXES = _suffixes()  # the registered runtimes with a file, when this module was imported
# the defaults of lightning_segcompress.data.transforms.SegmentationTransform (not imported: it pulls in Lightning)
IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                          "source": "ImageNet defaults (SegmentationTransform)"}


class ExportError(RuntimeError):
    """The network cannot be exported as asked; the message names the cause and the fix."""


def metadata_path(output: str | Path) -> Path:
    """``model.pte`` -> ``model.json`` (same folder, same stem)."""
    return Path(output).with_suffix(".json")


def check_output_path(runtime: str, output: str | Path | None) -> Path:
    """``output`` (default ``model.pte`` / ``model.ptl`` / ``model.onnx``), refused when its suffix is not the
    runtime's."""
    from lightning_segcompress.benchmark.runtimes import canonical_name

    suffixes = _suffixes()
    try:
        runtime = canonical_name(runtime)
    except ValueError:
        pass
    if runtime not in suffixes:
        raise ValueError(f"Unknown runtime {runtime!r}; choose one of {sorted(suffixes)}.")
    suffix = suffixes[runtime]
    if output is None:
        return Path(f"model{suffix}")
    output = Path(output)
    if output.suffix != suffix:
        expected = {s: r for r, s in suffixes.items()}
        hint = f" (a {output.suffix} file is the {expected[output.suffix]} runtime's)" if output.suffix in expected \
            else ""
        raise ValueError(f"--output {output} does not match runtime {runtime}: a {runtime} file ends in {suffix}"
                         f"{hint}; give --output {output.with_suffix(suffix)} or the matching --runtime.")
    return output


def default_class_names(num_classes: int) -> list[str]:
    return [f"class_{i}" for i in range(num_classes)]


def checked_class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    """``class_names`` as a list (default ``class_0`` ...), refused unless there is one per class."""
    names = [str(n) for n in class_names] if class_names is not None else default_class_names(num_classes)
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names given but the network predicts {num_classes} classes; give "
                         f"{num_classes} names (--class_names) or none (class_0..class_{num_classes - 1}).")
    return names


def data_normalization(datamodule) -> dict:
    """``{"mean", "std", "source"}`` of a data module: its ``mean``/``std`` attributes, else the ``Normalize`` of its
    ``eval_transform()``, else the ImageNet defaults (``source`` says which)."""
    name = type(datamodule).__name__
    mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
    if mean is not None and std is not None:
        return {"mean": [float(v) for v in mean], "std": [float(v) for v in std], "source": f"{name}.mean/std"}
    transform = None
    if callable(getattr(datamodule, "eval_transform", None)):
        try:
            transform = datamodule.eval_transform()
        except Exception:  # noqa: BLE001 - a transform we cannot build: fall back to the defaults
            transform = None
    normalize = _find_normalize(transform)
    if normalize is not None:
        return {"mean": [float(v) for v in normalize.mean], "std": [float(v) for v in normalize.std],
                "source": f"{name}.eval_transform()"}
    return {**IMAGENET_NORMALIZATION, "source": f"ImageNet defaults ({name} exposes no mean/std)"}


def _find_normalize(transform, depth: int = 0):
    """The first object with ``mean`` and ``std`` in a (nested) transform, e.g. torchvision's ``Normalize``."""
    if transform is None or depth > 4:
        return None
    if hasattr(transform, "mean") and hasattr(transform, "std"):
        return transform
    children = list(getattr(transform, "transforms", None) or [])
    children += [v for k, v in vars(transform).items() if not k.startswith("_") and k != "transforms"] \
        if hasattr(transform, "__dict__") else []
    for child in children:
        found = _find_normalize(child, depth + 1)
        if found is not None:
            return found
    return None


def network_to_export(network: nn.Module) -> tuple[nn.Module, dict]:
    """The module the file is made of and how it was obtained: a quantization-prepared (fake-quant) network is
    converted to int8 on a CPU copy (``network`` is left untouched); any other network is returned as it is (the
    benchmark exports a copy of it)."""
    from lightning_segcompress.quantization.quantize import convert_network, quantization_stage

    stage = quantization_stage(network)
    if stage is None:
        return network, {"quantization": None}
    info = {"quantization": {"backend": stage["config"].get("backend"), "qat": stage["config"].get("qat"),
                             "converted_here": not stage["converted"]}}
    if stage["converted"]:
        return network, info
    from lightning_segcompress.state import carry_stages

    prepared = copy.deepcopy(network).cpu().eval()
    carry_stages(network, prepared)  # a GraphModule's deep copy drops the instance attribute holding the stages
    try:
        converted = convert_network(prepared)
    except Exception as err:
        raise ExportError(f"The checkpoint's network is prepared for quantization ({stage['config'].get('backend')})"
                          f" but its int8 conversion failed: {type(err).__name__}: {err}. Export a checkpoint "
                          "written after a successful fit (its observers calibrated), or convert it in the "
                          "quantization callback first.") from err
    return converted.eval(), info


def write_bundle(
    network: nn.Module,
    runtime: str,
    input_size: Sequence[int],
    output: str | Path,
    *,
    batch_size: int = 1,
    class_names: Sequence[str] | None = None,
    normalization: dict | None = None,
    evaluation=None,
    threads: int | None = None,
    warmup: int = 3,
    runs: int = 10,
    atol: float = 1e-3,
    int8_agreement: float = 0.85,
    isolate: bool = True,
    export_options: dict | None = None,
) -> dict:
    """Export ``network`` for ``runtime`` to ``output`` plus ``model.json`` next to it; returns that metadata.

    A quantization-prepared network is exported as int8 (converted on a CPU copy; ``network`` is not modified).
    ``evaluation`` (an :class:`~lightning_segcompress.benchmark.accuracy.EvalSet` at ``input_size``): also score
    the exported file's val mIoU (and eager's on the same images). The file is timed on this machine (``warmup``,
    ``runs``, ``threads``; in a fresh worker process with ``isolate``). Raises :class:`ExportError` (cause and fix)
    if the export or its output check fails; then nothing is written at ``output``. ``export_options``: keyword
    options of the runtime's export (ONNX: ``dynamic``, ``opset``, ``calibration``).
    """
    from lightning_segcompress.benchmark.runner import BenchmarkSettings, LogitsOnly, benchmark_network
    from lightning_segcompress.benchmark.runtimes import get_runtime
    from lightning_segcompress.utils.inspection import input_channels
    from lightning_segcompress.utils.shapes import input_shape

    output = check_output_path(runtime, output)
    runtime = get_runtime(runtime).name
    shape = input_shape(input_size, batch_size, channels=input_channels(network), owner="export")
    model, conversion = network_to_export(network)
    export_options = dict(export_options or {})
    if export_options.get("calibration") is not None:
        export_options["calibration"] = list(export_options["calibration"])
        if conversion["quantization"] is not None:
            raise ExportError("The checkpoint's network is already quantized (its learned scales go into the file); "
                              "drop --quantize, which is for float checkpoints.")
        conversion = {"quantization": {"backend": "onnxruntime static (QDQ)", "qat": False, "converted_here": True,
                                       "calibration_batches": len(export_options["calibration"])}}
    checked_class_names(class_names, _num_classes(LogitsOnly(model), shape))  # before the slow export
    settings = BenchmarkSettings(input_shape=shape, runtimes=(runtime,), threads=threads, warmup=warmup, runs=runs,
                                 tolerance=atol, int8_agreement=int8_agreement, isolate=isolate, memory=False,
                                 profile=False)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=output.parent) as work:
        report = benchmark_network(model, settings, work, evaluation=evaluation,
                                   export_options={runtime: export_options})
        exported = Path(work) / get_runtime(runtime).artifact
        return bundle_from_report(model, report, runtime, exported, output, class_names=class_names,
                                  normalization=normalization, threads=threads, conversion=conversion)


def bundle_from_report(
    model: nn.Module,
    report: dict,
    runtime: str,
    exported: str | Path,
    output: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    normalization: dict | None = None,
    threads: int | None = None,
    conversion: dict | None = None,
    copy_file: bool = True,
) -> dict:
    """Write the bundle of an export :func:`benchmark_network` already made and measured: ``exported`` (its file
    of ``runtime``) goes to ``output`` (copied, or moved with ``copy_file=False``) and ``model.json`` next to it.
    ``model`` is the module that was exported (classes and quantization are read from it). Raises
    :class:`ExportError` if the report's entry for ``runtime`` is not ok."""
    from lightning_segcompress.benchmark.runner import LogitsOnly, is_int8
    from lightning_segcompress.benchmark.runtimes import get_runtime
    from lightning_segcompress.state import get_stages

    output = check_output_path(runtime, output)
    runtime = get_runtime(runtime).name
    entry = (report.get("runtimes") or {}).get(runtime)
    _raise_unless_ok(runtime, entry, report)
    exported = Path(exported)
    if not exported.is_file():
        raise ExportError(f"The {runtime} export reported success but wrote no file at {exported}.")
    shape = [int(s) for s in report["input_shape"]]
    num_classes = _num_classes(LogitsOnly(model), shape)
    names = checked_class_names(class_names, num_classes)
    normalization = dict(normalization) if normalization is not None else dict(IMAGENET_NORMALIZATION)
    accuracy = entry.get("accuracy") or {}
    metadata = {
        "format": "lightning_segcompress.export",
        "version": BUNDLE_VERSION,
        "file": output.name,
        "runtime": runtime,
        "size_bytes": exported.stat().st_size,
        "int8": bool(is_int8(model) or entry.get("int8")),
        "input": {"batch_size": shape[0], "channels": shape[1], "input_size": shape[2:], "dtype": "float32",
                  "layout": "NCHW", "dynamic": bool(entry.get("dynamic"))},
        "input_size": shape[2:],
        "normalization": normalization,
        "num_classes": num_classes,
        "class_names": names,
        "output": {"shape": [shape[0], num_classes, *shape[2:]], "meaning": "logits; argmax over dim 1 = class"},
        "compression_stages": get_stages(model),
        **(conversion or {"quantization": None}),
        "params": report.get("params"),
        "macs": report.get("macs"),
        "check": {"max_abs_diff": entry.get("max_abs_diff"), "argmax_agreement": entry.get("argmax_agreement"),
                  "export_method": entry.get("method"), "other_shape": entry.get("dynamic_check"),
                  "float_before_quantizing": entry.get("float_check")},
        "latency": {"median_ms": entry.get("median_ms"), "p90_ms": entry.get("p90_ms"),
                    "threads": threads if threads is not None else torch.get_num_threads(),
                    "peak_rss_mb": entry.get("peak_rss_mb"),
                    "measured_on": f"{platform.system()} {platform.machine()}"},
        "accuracy": None,
        "versions": {"torch": torch.__version__, "executorch": _version("executorch"),
                     "onnxruntime": _version("onnxruntime"),
                     "lightning_segcompress": _version("lightning-segcompress")},
    }
    if entry.get("opset") is not None:
        metadata["opset"] = entry["opset"]
    if entry.get("notes"):
        metadata["export_notes"] = list(entry["notes"])
    if accuracy.get("miou") is not None:
        metadata["accuracy"] = {"val_miou": accuracy["miou"], "eager_val_miou": accuracy["eager_miou"],
                                "gap_points": accuracy["gap_points"], "images": accuracy["images"],
                                "flagged": accuracy["flagged"]}
    elif accuracy.get("status") == "error" or report.get("accuracy_error"):
        error = accuracy.get("error") or report.get("accuracy_error") or {}
        metadata["accuracy"] = {"error": f"{error.get('type')}: {error.get('message')}"}
    _write_atomically(exported, output, metadata, copy_file)
    return metadata


def _raise_unless_ok(runtime: str, entry: dict | None, report: dict) -> None:
    if entry is None:
        raise ExportError(f"Nothing was exported for {runtime}: {report.get('error') or 'no report entry'}.")
    if entry.get("status") == "ok":
        return
    if entry.get("status") == "skipped":
        from lightning_segcompress.benchmark.runtimes import get_runtime

        reason = entry.get("reason", "")
        fix = (f"install it: {get_runtime(runtime).install_hint}" if "not installed" in reason else
               "export with --runtime torchscript_lite, or quantize with backend pt2e for ExecuTorch or ONNX"
               if "FX int8" in reason else "use --runtime torchscript_lite")
        raise ExportError(f"{runtime} cannot export this network: {reason}. Fix: {fix}.")
    error = entry.get("error") or {}
    message = f"{error.get('type')}: {error.get('message')}"
    if "int8 output predicts" in message:
        fix = ("the int8 file disagrees with the int8 network in eager: a network whose logits are nearly tied "
               "(barely trained) can fall below it from rounding alone (lower --int8_agreement to accept it); "
               "otherwise try the other runtime")
    elif "differs from eager" in message:
        fix = ("the exported file does not reproduce the network: raise --atol if the difference is float "
               "rounding, otherwise try the other runtime")
    elif "timing subprocess" in message:
        fix = "the exported file does not load or run in a fresh process; try the other runtime"
    else:
        fix = "see the error above; a network that torch.export/TorchScript cannot trace may export with the other " \
              "runtime"
    raise ExportError(f"The {runtime} export failed: {message}. Fix: {fix}.")


def _num_classes(model: nn.Module, shape: Sequence[int]) -> int:
    was_training = model.training
    model.eval()
    try:
        tensors = [*model.parameters(), *model.buffers()]
        device = tensors[0].device if tensors else torch.device("cpu")
        with torch.no_grad():
            return int(model(torch.zeros(*shape, device=device)).shape[1])
    finally:
        model.train(was_training)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _write_atomically(exported: Path, output: Path, metadata: dict, copy_file: bool) -> None:
    """The file and its JSON under temporary names in ``output``'s folder, then renamed: a failure leaves neither."""
    output.parent.mkdir(parents=True, exist_ok=True)
    json_path = metadata_path(output)
    tmp_file = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    tmp_json = json_path.with_name(f".{json_path.name}.{os.getpid()}.tmp")
    try:
        if copy_file:
            shutil.copyfile(exported, tmp_file)
        else:
            shutil.move(str(exported), tmp_file)
        tmp_json.write_text(json.dumps(metadata, indent=2) + "\n")
        os.replace(tmp_file, output)
        os.replace(tmp_json, json_path)
    finally:
        tmp_file.unlink(missing_ok=True)
        tmp_json.unlink(missing_ok=True)
