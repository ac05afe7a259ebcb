"""A third-party runtime adapter as a user would write one: torch.export's ``.pt2`` files, registered on import
(the benchmark's worker process imports this module to find it)."""

import torch

from lightning_segcompress.benchmark.runtimes import Runtime, register_runtime, runtime_names


def export_pt2(model, example, path):
    torch.export.save(torch.export.export(model, (example,)), str(path))
    return {"path": str(path), "size_bytes": path.stat().st_size, "method": "torch.export.save"}


def load_pt2(path, threads=None):
    return torch.export.load(str(path)).module()


def register() -> None:
    if "torch_export" not in runtime_names():
        register_runtime(Runtime("torch_export", "torch.export", ".pt2", export=export_pt2, load=load_pt2,
                                 aliases=("pt2",)))


register()
