"""Before/after ratios, the Markdown table and the report files."""

from __future__ import annotations

import json
from pathlib import Path


def compare(baseline: dict, current: dict) -> dict:
    """Per runtime: speedup, size ratio, MACs ratio and efficiency = speedup / MACs ratio.

    Every ratio is ``baseline / current`` so that > 1 means the current model is faster / smaller / cheaper.
    A runtime missing or failed on either side gets no ratios.
    """
    macs_ratio = _ratio(baseline.get("macs"), current.get("macs"))
    params_ratio = _ratio(baseline.get("params"), current.get("params"))
    ratios = {}
    for runtime, now in current.get("runtimes", {}).items():
        before = baseline.get("runtimes", {}).get(runtime, {})
        if now.get("status") != "ok" or before.get("status") != "ok":
            continue
        speedup = _ratio(before.get("median_ms"), now.get("median_ms"))
        ratios[runtime] = {
            "speedup": speedup,
            "size_ratio": _ratio(before.get("size_mb"), now.get("size_mb")),
            "macs_ratio": macs_ratio,
            "params_ratio": params_ratio,
            "efficiency": speedup / macs_ratio if speedup and macs_ratio else None,
        }
    return ratios


def add_stage(stages: dict[str, dict], name: str, report: dict) -> dict | None:
    """Record ``report`` as stage ``name``, with ratios against the ``"baseline"`` stage if there is one."""
    baseline = stages.get("baseline")
    ratios = compare(baseline["report"], report) if baseline is not None and name != "baseline" else None
    stages[name] = {"report": report, "ratios": ratios}
    return ratios


def _ratio(before, after):
    if before is None or after is None or after == 0:
        return None
    return before / after


COLUMNS = (
    "runtime",
    "status",
    "median ms",
    "p90 ms",
    "size MB",
    "params M",
    "GMACs",
    "model peak MB",
    "speedup",
    "size ratio",
    "MACs ratio",
    "efficiency",
)


def markdown_table(stages: dict[str, dict], label: str = "stage") -> str:
    """One row per (stage, runtime). ``stages`` maps a stage name to ``{"report": ..., "ratios": ...}``."""
    columns = (label, *COLUMNS)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for stage, content in stages.items():
        report, ratios = content["report"], content.get("ratios") or {}
        for runtime, entry in report.get("runtimes", {}).items():
            ratio = ratios.get(runtime, {})
            status = entry["status"]
            if status == "error":
                status = f"error: {entry['error']['type']}: {entry['error']['message'][:80]}"
            elif status == "skipped":
                status = f"skipped: {entry['reason'][:80]}"
            cells = [
                stage,
                runtime,
                status.replace("|", "/"),
                format_value(entry.get("median_ms"), 1),
                format_value(entry.get("p90_ms"), 1),
                format_value(entry.get("size_mb"), 2),
                format_value(_scale(report.get("params"), 1e6), 3),
                format_value(_scale(report.get("macs"), 1e9), 3),
                format_value(entry.get("model_peak_mb"), 0),
                format_value(ratio.get("speedup"), 2, "x"),
                format_value(ratio.get("size_ratio"), 2, "x"),
                format_value(ratio.get("macs_ratio"), 2, "x"),
                format_value(ratio.get("efficiency"), 2),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


MEMORY_COLUMNS = ("naive MB", "planned MB", "lower bound MB", "int8 planned MB", "measured eager peak MB",
                  "planned / naive", "peak in")


def memory_table(stages: dict[str, dict], label: str = "stage") -> str:
    """Activation memory per stage: the planner's numbers and eager PyTorch's measured peak (fp32)."""
    columns = (label, *MEMORY_COLUMNS)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for stage, content in stages.items():
        memory = content["report"].get("memory")
        if memory is None:
            continue
        if memory["status"] == "skipped":
            lines.append(f"| {stage} | skipped: {memory['reason']} |" + " |" * (len(MEMORY_COLUMNS) - 1))
            continue
        if memory["status"] != "ok":
            message = f"error: {memory['error']['type']}: {memory['error']['message'][:100]}".replace("|", "/")
            lines.append(f"| {stage} | {message} |" + " |" * (len(MEMORY_COLUMNS) - 1))
            continue
        ratio = memory["planned_mb"] / memory["naive_mb"] if memory["naive_mb"] else None
        numbers = ("naive_mb", "planned_mb", "lower_bound_mb", "int8_planned_mb", "measured_peak_mb")
        cells = [stage, *(format_value(memory[k], 2) for k in numbers), format_value(ratio, 3),
                 f"`{memory['peak_module'] or '—'}`"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _scale(value, factor):
    return None if value is None else value / factor


def format_value(value, digits: int, suffix: str = "") -> str:
    """``value`` with ``digits`` decimals and ``suffix``; empty for None (a table cell)."""
    return "" if value is None else f"{value:.{digits}f}{suffix}"


def write_report(output_dir: str | Path, stages: dict[str, dict], settings: dict) -> tuple[Path, Path]:
    """Write ``benchmark.json`` and ``benchmark.md``; returns both paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / "benchmark.json", output_dir / "benchmark.md"
    json_path.write_text(json.dumps({"settings": settings, "stages": stages}, indent=2))
    shape = "x".join(str(s) for s in settings.get("input_shape", []))
    md_path.write_text(
        f"# Device benchmark\n\nInput {shape}, threads {settings.get('threads') or 'default'}, "
        f"{settings.get('warmup')} warm-up + {settings.get('runs')} timed runs.\n"
        "Ratios are baseline / this stage (> 1 = faster, smaller, fewer MACs); "
        "efficiency = speedup / MACs ratio.\n\n" + markdown_table(stages) + "\n" + _memory_section(stages)
        + accuracy_section(stages) + profile_section(stages)
    )
    return json_path, md_path


def _memory_section(stages: dict[str, dict]) -> str:
    table = memory_table(stages)
    if not table:
        return ""
    return ("\n## Activation memory\n\nNaive = every activation in its own buffer; planned = one arena (greedy by "
            "size, best-fit); lower bound = most bytes alive at once; measured = peak of live tensors in eager "
            "PyTorch. Tiled stages run the network's prefix tile by tile (TiledInference).\n\n" + table + "\n")


def flat_metrics(stage: str, report: dict, ratios: dict | None = None) -> dict[str, float]:
    """Numbers for the trainer's loggers: ``benchmark/<stage>/<runtime>/<metric>``."""
    metrics = {}
    for key in ("params", "macs"):
        if report.get(key) is not None:
            metrics[f"benchmark/{stage}/{key}"] = float(report[key])
    for runtime, entry in report.get("runtimes", {}).items():
        for key in ("median_ms", "p90_ms", "size_mb", "peak_rss_mb", "model_peak_mb"):
            if entry.get(key) is not None:
                metrics[f"benchmark/{stage}/{runtime}/{key}"] = float(entry[key])
        accuracy = entry.get("accuracy") or {}
        for key, name in (("miou", "file_miou"), ("gap_points", "miou_gap_points")):
            if accuracy.get(key) is not None:
                metrics[f"benchmark/{stage}/{runtime}/{name}"] = float(accuracy[key])
        for key, value in (ratios or {}).get(runtime, {}).items():
            if value is not None:
                metrics[f"benchmark/{stage}/{runtime}/{key}"] = float(value)
    memory = report.get("memory") or {}
    if memory.get("status") == "ok":
        for key in ("naive_mb", "planned_mb", "lower_bound_mb", "int8_planned_mb", "measured_peak_mb"):
            metrics[f"benchmark/{stage}/memory/{key}"] = float(memory[key])
    return metrics


# ---- exported-file accuracy and operator profiles -----------------------------------------------------------------

ACCURACY_COLUMNS = ("runtime", "images", "eager mIoU", "file mIoU", "gap (points)", "flag")
PROFILE_COLUMNS = ("op", "calls", "ms", "share", "delegated", "dtype")


def _cell(text: str) -> str:
    return str(text).replace("|", "/")


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows])


def accuracy_rows(stages: dict[str, dict], label: str = "stage") -> tuple[list[str], list[list[str]]]:
    """One row per (stage, runtime) with an ``accuracy`` entry: images, eager's val mIoU and the runtime's (the
    exported file's) on the same inputs, the gap in points and the flag (``GAP > x``) where it exceeds the
    threshold; ``([], [])`` without any."""
    rows = []
    for stage, content in stages.items():
        for runtime, entry in content["report"].get("runtimes", {}).items():
            accuracy = entry.get("accuracy")
            if not accuracy:
                continue
            if accuracy.get("status") == "error":
                error = accuracy.get("error", {})
                rows.append([stage, runtime, "", "", "", "", f"error: {error.get('type')}: "
                                                           f"{str(error.get('message', ''))[:80]}"])
                continue
            flag = f"GAP > {accuracy['max_gap_points']:g}" if accuracy.get("flagged") else "ok"
            rows.append([stage, runtime, str(accuracy.get("images") or ""), format_value(accuracy["eager_miou"], 4),
                         format_value(accuracy["miou"], 4), format_value(accuracy["gap_points"], 2), flag])
    return ([label, *ACCURACY_COLUMNS], rows) if rows else ([], [])


def accuracy_section(stages: dict[str, dict]) -> str:
    """``## Exported-file accuracy`` (Markdown), or "" without accuracy entries."""
    header, rows = accuracy_rows(stages)
    if not header:
        return ""
    return ("\n## Exported-file accuracy\n\n" + ACCURACY_INTRO + "\n\n" + _table(header, rows) + "\n")


ACCURACY_INTRO = ("Val mIoU of each runtime's own output — the exported file run by its runtime (in the isolated "
                  "worker) — and of eager, on the same validation images fitted to the benchmark input size; gap = "
                  "file - eager in points, flagged when larger than the threshold. Eager's row is eager itself.")
PROFILE_INTRO = ("Time per operator per inference, measured in separate runs after the timed ones. eager / lite: "
                 "torch.profiler, self CPU time per op and input dtype; ExecuTorch: ETDump, XNNPACK's own "
                 "per-operator times inside the delegate (delegated = yes) and the portable kernels outside it. "
                 "dtype int8 / float; blank for data movement and float<->int8 conversions. 'Float islands' are "
                 "the ops computing in float in an int8 model.")


def _op_item(op: dict) -> str:
    if op.get("total_ms") is None:  # from the lowered graph: counts only
        return f"`{op['op']}` x{op.get('count', op.get('calls'))}" + (" (delegated)" if op.get("delegated") else "")
    return f"`{op['op']}` ({op['calls']}x, {op['total_ms']:.3f} ms, {100 * op['share']:.1f} %)"


def _op_list(ops: list[dict] | None) -> str:
    return "none" if not ops else "; ".join(_op_item(o) for o in ops)


def profile_blocks(stages: dict[str, dict], top: int = 10) -> list[dict]:
    """Per (stage, runtime) that has a profile: ``{"stage", "runtime", "title", "header", "rows" (the ``top``
    most expensive ops), "lines" (not delegated, float islands, notes or the error)}``."""
    blocks = []
    for stage, content in stages.items():
        for runtime, entry in content["report"].get("runtimes", {}).items():
            profile = entry.get("profile")
            if not profile:
                continue
            block = {"stage": stage, "runtime": runtime, "header": list(PROFILE_COLUMNS), "rows": [], "lines": []}
            if profile.get("status") != "ok":
                error = profile.get("error", {})
                block["title"] = f"{stage} / {runtime}"
                block["lines"].append(f"profile failed: {error.get('type')}: {error.get('message')}")
                blocks.append(block)
                continue
            block["title"] = (f"{stage} / {runtime}: {profile['source']}, {profile['total_ms']:.3f} ms per "
                              f"inference ({profile['runs']} runs)")
            for op in profile.get("ops", [])[:top]:
                delegated = {True: "yes", False: "no", None: ""}[op.get("delegated")]
                block["rows"].append([op["op"], str(op["calls"]), format_value(op["total_ms"], 3),
                                      format_value(100 * op["share"], 1, " %"), delegated, op.get("dtype") or ""])
            if runtime == "executorch":
                not_delegated = profile.get("not_delegated")
                if not_delegated is None and entry.get("non_delegated_ops") is not None:
                    not_delegated = [{"op": k, "count": v, "total_ms": None}
                                     for k, v in entry["non_delegated_ops"].items()]
                block["lines"].append(f"Not delegated (portable kernels): {_op_list(not_delegated)}")
            if profile.get("quantized"):
                islands = profile.get("float_islands")
                if islands is None:
                    islands = entry.get("float_islands")
                block["lines"].append(f"Float islands in the int8 model: {_op_list(islands)}")
                if runtime == "executorch" and entry.get("float_islands") is not None:
                    block["lines"].append(f"Float ops in the lowered graph: {_op_list(entry['float_islands'])}")
            block["lines"] += [f"Note: {n}" for n in profile.get("notes", [])]
            blocks.append(block)
    return blocks


def profile_section(stages: dict[str, dict], top: int = 10) -> str:
    """``## Operator profile`` (Markdown): per stage and runtime the ``top`` ops, the ops left out of the delegate
    and the float islands; "" without profiles."""
    blocks = profile_blocks(stages, top)
    if not blocks:
        return ""
    parts = ["\n## Operator profile", PROFILE_INTRO]
    for block in blocks:
        parts.append(f"### {block['title']}")
        if block["rows"]:
            parts.append(_table(block["header"], block["rows"]))
        if block["lines"]:
            parts.append("\n".join(f"- {line}" for line in block["lines"]))
    return "\n\n".join(parts) + "\n"
