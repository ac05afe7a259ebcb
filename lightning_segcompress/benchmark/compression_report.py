"""The compression report: one row per stage (baseline, after each technique, final) with validation mIoU, its
change against the first stage with a paired-bootstrap interval and verdict, and on-device cost; IoU per class
and stage; the accuracy/latency and accuracy/size trade-off, channels kept per layer and sample predictions, as
Markdown, HTML, JSON and PNG. Pure torch + numpy + matplotlib (without matplotlib only the tables are
written)."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from lightning_segcompress.benchmark.profile import top_ops
from lightning_segcompress.benchmark.report import (
    ACCURACY_INTRO,
    PROFILE_INTRO,
    accuracy_rows,
    format_value,
    profile_blocks,
    profile_section,
)
from lightning_segcompress.benchmark.runtimes import get_runtime, runtime_names
from lightning_segcompress.utils.inspection import evaluation_mode, extract_logits, module_device
from lightning_segcompress.utils.statistics import paired_bootstrap, per_class_iou

RUNTIME_LABELS = {name: get_runtime(name).label for name in runtime_names()}


def conv_widths(network: nn.Module) -> dict[str, int]:
    """Output channels of every convolution (float, QAT-prepared or int8), keyed by module name; the inner conv of
    a fused block (``name.0``) is reported under the block's name, so names match across those forms."""
    modules = dict(network.named_modules())
    widths = {}
    for name, module in modules.items():
        channels = getattr(module, "out_channels", None)
        if not isinstance(channels, int) or "conv" not in type(module).__name__.lower():
            continue
        parent, _, last = name.rpartition(".")
        if last == "0" and parent in modules and not hasattr(modules[parent], "out_channels") and \
                isinstance(modules[parent], nn.Sequential) and type(modules[parent]).__module__.startswith(
                    "torch.ao.nn.intrinsic"):
            name = parent
        widths[name] = channels
    return widths


def runtimes_in(stages: Mapping[str, dict]) -> list[str]:
    """Runtimes measured in any stage, in the order first seen."""
    seen: list[str] = []
    for content in stages.values():
        for runtime in content["report"].get("runtimes", {}):
            if runtime not in seen:
                seen.append(runtime)
    return seen


CONFIDENCE = 0.95  # the level of the report's intervals (the column says "95% CI")


def accuracy_statistics(confusions: Mapping[str, object], resamples: int = 1000, seed: int = 0,
                        level: float = CONFIDENCE, ignore_index: int | None = None,
                        reference: str | None = None) -> dict[str, dict]:
    """Per stage with per-image confusion matrices (``[N, C, C]``, same images in the same order for every
    stage): ``per_class_iou`` (list, None for a class absent from ground truth and prediction) and
    ``miou_change``, the paired bootstrap of mIoU(stage) - mIoU(reference) in points over the images
    (:func:`~lightning_segcompress.utils.statistics.paired_bootstrap`: ``estimate``, ``low``, ``high``,
    ``verdict``, ...). The ``reference`` (default: ``"baseline"`` if it has matrices, else the first stage) gets
    verdict ``"reference"``. Where no interval can be computed (no matrices for the reference, fewer than 2
    images, other images than the reference's, ``resamples`` 0) the verdict says why."""
    if not confusions:
        return {}
    if reference is None:
        reference = "baseline" if "baseline" in confusions else next(iter(confusions))
    statistics = {}
    for name, confusion in confusions.items():
        change: dict = {"reference": reference}
        if name == reference:
            change["verdict"] = "reference"
        elif reference not in confusions:
            change["verdict"] = f"n/a: no per-image scores for the reference stage {reference!r}"
        elif not resamples:
            change["verdict"] = "n/a: bootstrap_resamples is 0"
        else:
            try:
                change.update(paired_bootstrap(confusions[reference], confusion, resamples, seed, level,
                                               ignore_index).as_dict())
            except ValueError as err:
                change["verdict"] = f"n/a: {err}"
        iou = per_class_iou(confusion)
        statistics[name] = {"miou_change": change,
                            "per_class_iou": [None if math.isnan(v) else float(v) for v in iou]}
    return statistics


def _interval(change: Mapping | None) -> str:
    if not change or change.get("low") is None:
        return ""
    return f"[{change['low']:+.2f}, {change['high']:+.2f}]"


def stage_rows(stages: Mapping[str, dict]) -> tuple[list[str], list[list[str]]]:
    """The compression table as a header and rows of cells: stage, techniques, val mIoU and its change against
    the baseline with the paired-bootstrap 95 % interval and verdict (where the stage has ``miou_change``, see
    :func:`accuracy_statistics`), params, MACs, per runtime latency / file size / speedup / times smaller,
    planned activations."""
    runtimes = runtimes_in(stages)
    header = ["stage", "techniques", "val mIoU", "mIoU change (points)", f"{100 * CONFIDENCE:.0f}% CI (points)",
              "verdict", "params M", "GMACs"]
    for runtime in runtimes:
        label = RUNTIME_LABELS.get(runtime, runtime)
        header += [f"{label} ms", f"{label} MB", f"{label} speedup", f"{label} x smaller"]
    header.append("planned activations MB")
    baseline_miou = stages.get("baseline", {}).get("miou")
    rows = []
    for name, content in stages.items():
        report, ratios = content["report"], content.get("ratios") or {}
        miou = content.get("miou")
        change = None if miou is None or baseline_miou is None or name == "baseline" else 100 * (miou - baseline_miou)
        stats = content.get("miou_change") or {}
        row = [name, " + ".join(content.get("techniques") or []) or "none", format_value(miou, 4),
               format_value(change, 2), _interval(stats), stats.get("verdict", ""),
               _scaled(report.get("params"), 1e6, 3), _scaled(report.get("macs"), 1e9, 3)]
        for runtime in runtimes:
            entry = report.get("runtimes", {}).get(runtime, {})
            ratio = ratios.get(runtime, {})
            if entry.get("status") == "ok":
                row += [format_value(entry.get("median_ms"), 1), format_value(entry.get("size_mb"), 2),
                        format_value(ratio.get("speedup"), 2, "x"), format_value(ratio.get("size_ratio"), 2, "x")]
            else:
                row += [entry.get("status", "—"), "", "", ""]
        memory = report.get("memory") or {}
        row.append(format_value(memory.get("planned_mb"), 2) if memory.get("status") == "ok" else "")
        rows.append(row)
    return header, rows


def compression_table(stages: Mapping[str, dict]) -> str:
    """The stage table as Markdown."""
    return _markdown(*stage_rows(stages))


def per_class_rows(stages: Mapping[str, dict], class_names: Sequence[str] | None = None
                   ) -> tuple[list[str], list[list[str]]]:
    """IoU per class (x100) as a header (``class`` and one column per stage with ``per_class_iou``) and one row per
    class; ``—`` where a class is in neither the ground truth nor the prediction. ``([], [])`` without data."""
    scored = {name: content["per_class_iou"] for name, content in stages.items() if content.get("per_class_iou")}
    if not scored:
        return [], []
    classes = max(len(iou) for iou in scored.values())
    names = list(class_names) if class_names is not None and len(class_names) == classes else \
        [str(k) for k in range(classes)]
    rows = []
    for k in range(classes):
        cells = [names[k]]
        for iou in scored.values():
            value = iou[k] if k < len(iou) else None
            cells.append("—" if value is None else format_value(100 * value, 1))
        rows.append(cells)
    return ["class", *scored], rows


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    return "<table>\n<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>\n" + "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>\n" for row in rows) + "</table>"


def per_class_table(stages: Mapping[str, dict], class_names: Sequence[str] | None = None) -> str:
    """The IoU-per-class table as Markdown ("" without per-class data)."""
    header, rows = per_class_rows(stages, class_names)
    return _markdown(header, rows) if header else ""


def _scaled(value, factor: float, digits: int) -> str:
    return "" if not value else format_value(value / factor, digits)  # 0: not countable (a PT2E int8 graph)


# ---- figures --------------------------------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def tradeoff_figure(stages: Mapping[str, dict], key: str = "median_ms"):
    """Validation mIoU against ``key`` (``"median_ms"`` or ``"size_mb"``) per runtime, stages joined in order;
    ``None`` without matplotlib or without a stage that has both numbers."""
    plt = _pyplot()
    if plt is None:
        return None
    label = {"median_ms": "latency (ms, median)", "size_mb": "model file size (MB)"}[key]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    plotted = False
    for runtime in runtimes_in(stages):
        points = [(content["report"]["runtimes"][runtime][key], 100 * content["miou"], name)
                  for name, content in stages.items()
                  if content.get("miou") is not None
                  and content["report"].get("runtimes", {}).get(runtime, {}).get("status") == "ok"]
        if not points:
            continue
        plotted = True
        xs, ys, names = zip(*points)
        ax.plot(xs, ys, marker="o", label=RUNTIME_LABELS.get(runtime, runtime))
        for x, y, name in points:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel(label)
    ax.set_ylabel("val mIoU (%)")
    ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"mIoU vs {label.split(' (')[0]}")
    fig.tight_layout()
    return fig


def channels_figure(stages: Mapping[str, dict]):
    """Fraction of the baseline's output channels each stage keeps, per convolution (baseline order; gaps where a
    stage lacks the layer); ``None`` without matplotlib or channel data."""
    plt = _pyplot()
    with_widths = {name: c["channels"] for name, c in stages.items() if c.get("channels")}
    if plt is None or not with_widths:
        return None
    reference = with_widths.get("baseline") or next(iter(with_widths.values()))
    layers = list(reference)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.08 * len(layers)), 4.2))
    for name, widths in with_widths.items():
        kept = [widths[layer] / reference[layer] if layer in widths else float("nan") for layer in layers]
        ax.step(range(len(layers)), kept, where="mid", label=name, linewidth=1.2)
    ax.set_xlabel(f"convolution (network order, {len(layers)} layers)")
    ax.set_ylabel("output channels kept (of baseline)")
    ax.set_ylim(0, 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    kept = _kept_fraction(reference, next(reversed(with_widths.values())))
    ax.set_title("channels kept per layer" + (f" (last stage: {100 * kept:.0f} % overall)" if kept else ""))
    fig.tight_layout()
    return fig


def _kept_fraction(reference: dict[str, int], widths: dict[str, int]) -> float | None:
    shared = [layer for layer in reference if layer in widths]
    total = sum(reference[layer] for layer in shared)
    return sum(widths[layer] for layer in shared) / total if total else None


def samples_figure(images: torch.Tensor, masks: torch.Tensor | None, predictions: Mapping[str, torch.Tensor],
                   num_classes: int | None = None, ignore_index: int = 255):
    """A grid with one row per image: the image, the ground truth and each labelled prediction (class maps
    ``[N, H, W]``; ``num_classes`` default: the highest class shown + 1); ``None`` without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    if num_classes is None:
        labels = masks[masks != ignore_index] if masks is not None else torch.empty(0)
        highest = [int(p.max()) for p in predictions.values()] + ([int(labels.max())] if labels.numel() else [])
        num_classes = 1 + max(highest, default=0)
    from matplotlib.colors import ListedColormap

    colours = plt.get_cmap("tab20" if num_classes > 10 else "tab10").colors[:max(num_classes, 1)]
    cmap = ListedColormap([(0.0, 0.0, 0.0), *colours])  # index 0: ignored pixels
    columns = {"image": None, **({"ground truth": masks} if masks is not None else {}), **predictions}
    rows = images.shape[0]
    fig, axes = plt.subplots(rows, len(columns), figsize=(2.0 * len(columns), 2.0 * rows), squeeze=False)
    for r in range(rows):
        for c, (title, maps) in enumerate(columns.items()):
            ax = axes[r][c]
            if maps is None:
                image = images[r].float()
                low, high = image.amin(), image.amax()
                ax.imshow(((image - low) / (high - low + 1e-8)).permute(1, 2, 0).clamp(0, 1).cpu().numpy())
            else:
                shown = maps[r].long().clone() + 1
                shown[maps[r] == ignore_index] = 0
                ax.imshow(shown.cpu().numpy(), cmap=cmap, vmin=0, vmax=len(colours), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


# ---- files ----------------------------------------------------------------------------------------------------

def write_compression_report(output_dir: str | Path, stages: Mapping[str, dict], settings: Mapping,
                             figures: Mapping[str, object], class_names: Sequence[str] | None = None
                             ) -> dict[str, Path]:
    """Write ``compression_report.md``, ``.html`` and ``.json`` (per stage: techniques, val mIoU, its change with
    interval and verdict, IoU per class) and one PNG per figure (``name.png``; None entries are skipped); returns
    the written paths by name."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, figure in figures.items():
        if figure is None:
            continue
        path = output_dir / f"{name}.png"
        figure.savefig(path, dpi=110)
        written[name] = path
    shape = "x".join(str(s) for s in settings.get("input_shape", []))
    intro = (f"Latency and size at input {shape}, threads {settings.get('threads') or 'default'}, "
             f"{settings.get('warmup')} warm-up + {settings.get('runs')} timed runs (median). Speedup and "
             "'x smaller' are baseline / stage in the same runtime; the mIoU change is against the baseline, in "
             "points. Stages: the baseline, the network as each technique left it, the final model.")
    changes = [c["miou_change"] for c in stages.values() if (c.get("miou_change") or {}).get("low") is not None]
    if changes:
        intro += (f" The {100 * CONFIDENCE:.0f}% CI is a paired bootstrap over the {changes[0]['images']} validation "
                  f"images ({changes[0]['resamples']} resamples, the same images for both stages) of mIoU(stage) "
                  f"- mIoU({changes[0]['reference']}); verdict 'better' / 'worse' when the interval excludes 0, "
                  "else 'no measurable difference'. It covers the choice of validation images, not training "
                  "noise (other seeds).")
        if changes[0]["images"] < 20:
            intro += f" With only {changes[0]['images']} images the interval is rough."
    class_header, class_rows = per_class_rows(stages, class_names)
    class_intro = ("IoU per class (x100) on the same validation images; — where a class is in neither the "
                   "ground truth nor the prediction.")
    class_section = ["## IoU per class", class_intro, _markdown(class_header, class_rows)] if class_header else []
    accuracy_header, accuracy_table_rows = accuracy_rows(stages)
    accuracy_part = ["## Exported-file accuracy", ACCURACY_INTRO, _markdown(accuracy_header, accuracy_table_rows)] \
        if accuracy_header else []
    blocks = profile_blocks(stages)  # also for the HTML below
    profile_part = [profile_section(stages).strip()] if blocks else []
    images = [f"![{name}]({path.name})" for name, path in written.items()]
    markdown = "\n\n".join(["# Compression report", intro, compression_table(stages), *class_section,
                             *accuracy_part, *profile_part, *images]) + "\n"
    (output_dir / "compression_report.md").write_text(markdown)
    written["markdown"] = output_dir / "compression_report.md"
    table = _html_table(*stage_rows(stages))
    if class_header:
        table += (f"\n<h2>IoU per class</h2>\n<p>{html.escape(class_intro)}</p>\n"
                  f"{_html_table(class_header, class_rows)}")
    if accuracy_header:
        table += (f"\n<h2>Exported-file accuracy</h2>\n<p>{html.escape(ACCURACY_INTRO)}</p>\n"
                  f"{_html_table(accuracy_header, accuracy_table_rows)}")
    if blocks:
        table += f"\n<h2>Operator profile</h2>\n<p>{html.escape(PROFILE_INTRO)}</p>"
        for block in blocks:
            table += f"\n<h3>{html.escape(block['title'])}</h3>\n"
            if block["rows"]:
                table += _html_table(block["header"], block["rows"])
            if block["lines"]:
                table += "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in block["lines"]) + "</ul>"
    body = "\n".join(f'<p><img src="{html.escape(p.name)}" alt="{html.escape(n)}"></p>' for n, p in written.items()
                     if p.suffix == ".png")
    (output_dir / "compression_report.html").write_text(
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>Compression report</title>"
        "<style>body{font-family:sans-serif} td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "table{border-collapse:collapse}</style></head><body>\n<h1>Compression report</h1>\n"
        f"<p>{html.escape(intro)}</p>\n{table}\n{body}\n</body></html>\n")
    written["html"] = output_dir / "compression_report.html"
    summary = {name: {"techniques": content.get("techniques") or [], "miou": content.get("miou"),
                      "miou_change": content.get("miou_change"), "per_class_iou": content.get("per_class_iou"),
                      "exported": exported_summary(content)}
               for name, content in stages.items()}
    classes = max((len(c["per_class_iou"]) for c in summary.values() if c["per_class_iou"]), default=0)
    names = list(class_names) if class_names is not None and len(class_names) == classes else None
    (output_dir / "compression_report.json").write_text(json.dumps(
        {"settings": dict(settings), "level": CONFIDENCE, "class_names": names, "stages": summary}, indent=1))
    written["json"] = output_dir / "compression_report.json"
    return written


def exported_summary(content: Mapping) -> dict[str, dict]:
    """Per runtime of a stage: ``accuracy`` (file vs eager val mIoU), ``top_ops`` (10 most expensive),
    ``not_delegated`` and ``float_islands`` (None where not applicable), for the report's JSON."""
    summary = {}
    for runtime, entry in content["report"].get("runtimes", {}).items():
        profile = entry.get("profile") or {}
        if not entry.get("accuracy") and not profile:
            continue
        ok = profile.get("status") == "ok"
        summary[runtime] = {"accuracy": entry.get("accuracy"), "top_ops": top_ops(profile),
                            "not_delegated": profile.get("not_delegated") if ok else None,
                            "float_islands": profile.get("float_islands") if ok else None,
                            "profile_error": None if ok or not profile else profile.get("error")}
    return summary


def predicted_classes(network: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``network``'s class map for ``images`` (eval mode, logits resized to the images), on the CPU."""
    with evaluation_mode(network):
        logits = extract_logits(network(images.to(module_device(network))))
    if logits.shape[-2:] != images.shape[-2:]:
        logits = nn.functional.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return logits.argmax(1).cpu()


def write_report_with_figures(output_dir: str | Path, stages: Mapping[str, dict], settings: Mapping,
                              class_names: Sequence[str] | None = None, samples: object | None = None,
                              on_figure: Callable[[str, object], None] | None = None) -> dict[str, Path]:
    """:func:`write_compression_report` with its standard figures (mIoU vs latency and vs size, channels per
    layer, and ``samples`` where given); ``on_figure(name, figure)`` sees each figure before it is closed."""
    import matplotlib.pyplot as plt

    figures = {"miou_vs_latency": tradeoff_figure(stages, "median_ms"),
               "miou_vs_size": tradeoff_figure(stages, "size_mb"), "channels_per_layer": channels_figure(stages)}
    if samples is not None:
        figures["samples"] = samples
    paths = write_compression_report(output_dir, stages, settings, figures, class_names)
    for name, figure in figures.items():
        if figure is None:
            continue
        if on_figure is not None:
            on_figure(name, figure)
        figure.clear()
        plt.close(figure)
    return paths


def check_bootstrap_resamples(resamples: object) -> None:
    if isinstance(resamples, bool) or not isinstance(resamples, int) or (resamples != 0 and resamples < 100):
        raise ValueError(f"bootstrap_resamples must be 0 (no interval) or an int >= 100 (a percentile interval from "
                         f"fewer resamples is noise), got {resamples!r}.")


def add_accuracy_statistics(stages: dict[str, dict], confusions: Mapping[str, torch.Tensor], resamples: int,
                            ignore_index: int = 255) -> None:
    """Give every stage its mIoU change against the baseline (the first scored stage without one; paired bootstrap)
    and its IoU per class, in place."""
    scored = [name for name, content in stages.items() if content.get("miou") is not None]
    reference = "baseline" if "baseline" in stages else next(iter(scored), None)
    statistics = accuracy_statistics(confusions, resamples, ignore_index=ignore_index, reference=reference)
    for name, content in stages.items():
        content.update(statistics.get(name, {"miou_change": None, "per_class_iou": None}))
