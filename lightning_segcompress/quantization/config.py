"""What to quantize and how, as plain data (stored in checkpoints)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from lightning_segcompress.utils.inspection import select_modules

BACKENDS = ("fx", "pt2e")
FX_ENGINES = ("x86", "qnnpack")


class QuantizationError(RuntimeError):
    """A network cannot be prepared, converted or restored for quantization; the message names the cause and
    the fix."""


@dataclass(frozen=True)
class QuantizationConfig:
    """``backend="pt2e"`` (default): torch.export + torchao PT2E with the XNNPACK quantizer, int8 on ExecuTorch;
    ``"fx"`` (legacy): torch.ao FX graph mode with ``engine`` (``x86`` or ``qnnpack``), int8 modules for eager and
    the TorchScript lite interpreter; torch.ao FX quantization and TorchScript are deprecated upstream and FX is
    kept for that route only. ``qat=False`` inserts observers
    only (post-training quantization). ``keep_float`` are module names left in float (FX: not traced either).
    ``example_shape`` is the ``[N, C, H, W]`` input used to trace (PT2E keeps the batch dimension dynamic)."""

    backend: str = "pt2e"
    engine: str = "x86"
    qat: bool = True
    keep_float: tuple[str, ...] = ()
    per_channel: bool = True
    example_shape: tuple[int, ...] = (2, 3, 64, 64)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}.")
        if self.backend == "fx" and self.engine not in FX_ENGINES:
            raise ValueError(f"engine must be one of {list(FX_ENGINES)} for the fx backend, got {self.engine!r}.")
        if len(self.example_shape) != 4 or any(int(s) <= 0 for s in self.example_shape):
            raise ValueError(f"example_shape is [N, C, H, W] with positive sizes, got {list(self.example_shape)}.")
        if self.backend == "pt2e" and self.example_shape[0] < 2:
            raise ValueError("pt2e needs an example batch of at least 2 so that the batch dimension stays dynamic.")

    def as_dict(self) -> dict:
        data = asdict(self)
        data["keep_float"] = list(self.keep_float)
        data["example_shape"] = list(self.example_shape)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> QuantizationConfig:
        data = dict(data)
        data["keep_float"] = tuple(data.get("keep_float", ()))
        data["example_shape"] = tuple(data.get("example_shape", (2, 3, 64, 64)))
        return cls(**data)


def resolve_keep_float(network: nn.Module, patterns: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Module names (exact, or regexes matched against the whole name) -> the outermost matching modules."""
    chosen = select_modules(network, patterns, "keep_float", QuantizationError)
    outermost = [n for n in chosen if not any(n.startswith(other + ".") for other in chosen if other != n)]
    return tuple(dict.fromkeys(outermost))
