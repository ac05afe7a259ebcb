import ast
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lightning_segcompress.benchmark import executorch_runtime as etr  # noqa: E402


def test_module_imports_executorch_and_lightning_lazily():
    tree = ast.parse(open(etr.__file__).read())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
    assert not top_level & {"executorch", "lightning", "pytorch_lightning"}


def test_available_reports_missing_executorch(monkeypatch):
    for name in [m for m in sys.modules if m == "executorch" or m.startswith("executorch.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "executorch", None)  # makes `import executorch` raise ImportError
    ok, reason = etr.executorch_available()
    assert not ok
    assert "not installed" in reason and "lightning-segcompress[executorch]" in reason
    with pytest.raises(ImportError, match="executorch"):
        etr.export_executorch(torch.nn.Identity().eval(), torch.zeros(1, 3, 8, 8), "unused.pte")


@pytest.fixture(scope="module")
def executorch():
    return pytest.importorskip("executorch")


def _tiny_convnet():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 1),
    )
    with torch.no_grad():  # non-trivial BN statistics so folding them is actually exercised
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def _tiny_unet():
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    return smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 8), classes=4).eval()


def test_available(executorch):
    assert etr.executorch_available() == (True, "")


@pytest.mark.parametrize("build", [_tiny_convnet, _tiny_unet], ids=["convnet", "smp_unet"])
def test_export_and_run_matches_eager(executorch, tmp_path, build):
    model = build()
    torch.manual_seed(1)
    x = torch.randn(1, 3, 64, 64)
    path = tmp_path / "sub" / "model.pte"

    info = etr.export_executorch(model, x, path)

    assert info["path"] == str(path)
    assert path.is_file()
    assert info["size_bytes"] == path.stat().st_size > 0
    assert not list(tmp_path.rglob("*.tmp"))
    assert info["partitions"] >= 1 and info["delegated_nodes"] > 0
    assert info["non_delegated_nodes"] == sum(info["non_delegated_ops"].values())

    program = etr.ExecuTorchProgram(path)
    assert program.input_shape == (1, 3, 64, 64)
    with torch.no_grad():
        for inp in (x, torch.randn(1, 3, 64, 64)):  # run twice: the program is reusable
            expected = model(inp)
            out = program(inp)
            assert isinstance(out, torch.Tensor)
            assert out.shape == expected.shape
            torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_program_rejects_other_shapes_and_missing_files(executorch, tmp_path):
    model = _tiny_convnet()
    path = tmp_path / "m.pte"
    etr.export_executorch(model, torch.randn(1, 3, 16, 16), path)
    program = etr.ExecuTorchProgram(path)
    with pytest.raises(ValueError, match="static shapes"):
        program(torch.randn(1, 3, 32, 32))
    with pytest.raises(KeyError, match="no method"):
        etr.ExecuTorchProgram(path, method="missing")
    with pytest.raises(FileNotFoundError):
        etr.ExecuTorchProgram(tmp_path / "absent.pte")


def test_export_rejects_training_mode(executorch, tmp_path):
    with pytest.raises(ValueError, match="eval"):
        etr.export_executorch(_tiny_convnet().train(), torch.randn(1, 3, 8, 8), tmp_path / "m.pte")
