"""Segment one image with a file written by ``segcompress export`` — the script to copy to the device.

    python segment_image.py model.pte image.png --output mask.png
    python segment_image.py model.ptl image.png --output mask.png
    python segment_image.py model.onnx image.png --output mask.png

It reads ``model.json`` next to the model (input size, normalization, class count), resizes the image to the
model's input size, normalizes it, runs the file, takes the argmax and writes a colour PNG at the image's own size
(nearest resize). ``--classes_out classes.png`` also writes the raw class ids (8-bit grey).

Self-contained (no lightning_segcompress import). Needs numpy and Pillow, plus the runtime of the file:
``executorch`` for ``.pte`` (its Python runtime takes torch tensors), ``torch`` for ``.ptl`` (the lite interpreter),
``onnxruntime`` for ``.onnx`` (no torch needed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

# Cityscapes colours for the first 19 classes; more classes get deterministic colours after them
CITYSCAPES_PALETTE = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]


def palette(num_classes: int) -> np.ndarray:
    """``[num_classes, 3]`` uint8 colours: Cityscapes' first, then a fixed pseudo-random sequence."""
    colours = list(CITYSCAPES_PALETTE[:num_classes])
    rng = np.random.default_rng(0)
    while len(colours) < num_classes:
        colours.append(tuple(int(c) for c in rng.integers(0, 256, size=3)))
    return np.asarray(colours, dtype=np.uint8).reshape(-1, 3)


def read_metadata(model_path: str | Path) -> dict:
    """``model.json`` next to ``model_path`` (same stem)."""
    path = Path(model_path).with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: copy the model.json that segcompress export wrote next to "
                                f"{Path(model_path).name}.")
    return json.loads(path.read_text())


def preprocess(image: Image.Image, metadata: dict) -> np.ndarray:
    """``[N, 3, H, W]`` float32: the RGB image resized (bilinear) to the model's input, scaled to [0, 1],
    normalized with the model's mean/std, repeated to the exported batch size."""
    height, width = metadata["input_size"]
    resized = image.convert("RGB").resize((width, height), Image.BILINEAR)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    mean = np.asarray(metadata["normalization"]["mean"], dtype=np.float32)
    std = np.asarray(metadata["normalization"]["std"], dtype=np.float32)
    array = ((array - mean) / std).transpose(2, 0, 1)[None]
    batch = int(metadata.get("input", {}).get("batch_size", 1))
    return np.ascontiguousarray(np.repeat(array, batch, axis=0), dtype=np.float32)


def load_model(model_path: str | Path, threads: int | None = None):
    """A callable ``numpy [N, 3, H, W] -> numpy logits [N, C, H, W]`` for a ``.pte``, ``.ptl`` or ``.onnx`` file."""
    model_path = Path(model_path)
    if model_path.suffix == ".onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run(x: np.ndarray) -> np.ndarray:
            return session.run(None, {name: x})[0]

        return run
    if model_path.suffix == ".pte":
        import torch
        from executorch.runtime import Runtime

        if threads:
            try:  # the XNNPACK thread pool; absent from some executorch builds
                from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

                _unsafe_reset_threadpool(threads)
            except Exception:  # noqa: BLE001
                pass
        method = Runtime.get().load_program(str(model_path)).load_method("forward")

        def run(x: np.ndarray) -> np.ndarray:
            outputs = method.execute([torch.from_numpy(x)])
            return outputs[0].detach().numpy()

        return run
    if model_path.suffix == ".ptl":
        import torch
        from torch.jit.mobile import _load_for_lite_interpreter

        if threads:
            torch.set_num_threads(threads)
        module = _load_for_lite_interpreter(str(model_path))

        def run(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                output = module(torch.from_numpy(x))
            if isinstance(output, dict):  # torchvision-style {"out": logits}
                output = output["out"]
            elif isinstance(output, (list, tuple)):
                output = output[0]
            return output.detach().numpy()

        return run
    raise ValueError(f"{model_path} is neither an ExecuTorch .pte, a TorchScript lite .ptl nor an ONNX .onnx file.")


def segment(model_path: str | Path, image: Image.Image, threads: int | None = None) -> np.ndarray:
    """The class id of every pixel of ``image`` (``[h, w]`` uint8/int64 at the image's size)."""
    metadata = read_metadata(model_path)
    logits = load_model(model_path, threads)(preprocess(image, metadata))
    classes = logits[0].argmax(0).astype(np.uint8 if metadata["num_classes"] <= 256 else np.int32)
    mask = Image.fromarray(classes) if classes.dtype == np.uint8 else Image.fromarray(classes, mode="I")
    return np.asarray(mask.resize(image.size, Image.NEAREST))


def colourize(classes: np.ndarray, num_classes: int) -> Image.Image:
    colours = palette(max(num_classes, int(classes.max()) + 1))
    return Image.fromarray(colours[classes.astype(np.int64)], mode="RGB")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model.pte, model.ptl or model.onnx (model.json next to it)")
    parser.add_argument("image", help="input image (any format Pillow reads)")
    parser.add_argument("--output", default="mask.png", help="colour PNG of the predicted classes")
    parser.add_argument("--classes_out", default=None, help="also write the class ids as an 8-bit PNG")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: the runtime's)")
    args = parser.parse_args(argv)
    image = Image.open(args.image)
    metadata = read_metadata(args.model)
    classes = segment(args.model, image, args.threads)
    output = Path(args.output)
    colourize(classes, metadata["num_classes"]).save(output)
    if args.classes_out:
        Image.fromarray(classes.astype(np.uint8)).save(args.classes_out)
    present = {metadata["class_names"][c] if c < len(metadata.get("class_names", [])) else str(c): int(n)
               for c, n in zip(*np.unique(classes, return_counts=True))}
    print(f"{output}: {image.size[0]}x{image.size[1]}, pixels per class: {present}")
    return output


if __name__ == "__main__":
    main()
