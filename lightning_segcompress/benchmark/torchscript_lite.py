"""Export to the TorchScript lite interpreter (.ptl), the classic PyTorch Mobile runtime."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from lightning_segcompress.utils.inspection import has_int8_modules


def export_torchscript_lite(model: nn.Module, example: torch.Tensor, path: str | Path) -> dict:
    """Trace (falling back to script), freeze (not int8 models), try ``optimize_for_mobile``, save for the lite
    interpreter.

    The trace is checked on other inputs (the negated example and a random one) so that a data-dependent
    Python branch, which a trace silently bakes in, is detected and scripting is tried instead.
    ``optimize_for_mobile`` needs a torch build with XNNPACK; where it fails the frozen module is saved and
    the reason recorded.

    Returns ``{"path", "size_bytes", "method", "mobile_optimized", "notes"}``; raises if neither tracing
    nor scripting works.
    """
    model = model.eval()
    path = Path(path)
    notes: list[str] = []
    # A negated input flips every sign-dependent branch; a fresh random input catches the rest.
    check_inputs = [(example,), (-example,), (torch.randn_like(example),)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            compiled = torch.jit.trace(model, example, check_inputs=check_inputs)
            method = "trace"
        except Exception as trace_error:  # noqa: BLE001 - any tracing failure falls back to scripting
            notes.append(f"trace failed ({type(trace_error).__name__}: {_first_line(trace_error)}); scripted")
            try:
                compiled = torch.jit.script(model)
            except Exception as script_error:
                raise RuntimeError(
                    f"TorchScript export failed: trace: {type(trace_error).__name__}: {_first_line(trace_error)}; "
                    f"script: {type(script_error).__name__}: {_first_line(script_error)}"
                ) from script_error
            method = "script"
        if has_int8_modules(model):
            # freezing inlines packed int8 weights as constants *and* keeps them packed: a lite file twice the size
            frozen = compiled.eval()
            notes.append("not frozen: int8 packed weights would be stored twice")
        else:
            frozen = torch.jit.freeze(compiled.eval())
        try:
            from torch.utils.mobile_optimizer import optimize_for_mobile

            to_save = optimize_for_mobile(frozen)
            mobile_optimized = True
        except Exception as err:  # noqa: BLE001 - e.g. "XNNPACK is not enabled" in this torch build
            to_save = frozen
            mobile_optimized = False
            notes.append(f"optimize_for_mobile skipped: {type(err).__name__}: {_first_line(err)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    to_save._save_for_lite_interpreter(str(path))
    return {"path": str(path), "size_bytes": path.stat().st_size, "method": method,
            "mobile_optimized": mobile_optimized, "notes": notes}


def load_lite(path: str | Path):
    """Load a .ptl with the lite interpreter; the result is callable like the module."""
    from torch.jit.mobile import _load_for_lite_interpreter

    return _load_for_lite_interpreter(str(path))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else ""
