"""The runnable examples under examples/ do what their docstrings say."""

import runpy

import pytest

from support.common import REPO

EXAMPLES = REPO / "examples"


@pytest.mark.slow
def test_custom_compression_callback_filters_every_step_and_observes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runpy.run_path(str(EXAMPLES / "custom_compression_callback.py"))["main"]()
    assert result["widths"]["0"] == 32, "the protected layer keeps all its channels"
    assert result["widths"]["3"] < 32, "the other layer was pruned"
    assert len(result["removed"]) == 2 and all(count > 0 for count in result["removed"])
    assert sum(result["removed"]) == 32 - result["widths"]["3"]


FRESH_PROCESS_LOAD = """
import importlib.util, sys
import torch
from torch import nn
from lightning_segcompress import load_compressed

spec = importlib.util.spec_from_file_location("third_party_producer", sys.argv[1])
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)  # defining FuseBatchNorm registers its stage kind
network = load_compressed(example.TinySegNet(), sys.argv[2]).eval()
assert not any(isinstance(m, nn.BatchNorm2d) for m in network.modules())
torch.save(network(torch.load(sys.argv[3])), sys.argv[4])
"""


@pytest.mark.slow
def test_third_party_producer_checkpoint_restores_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    import torch
    from torch import nn

    from lightning_segcompress.state import stage_kinds

    source = EXAMPLES / "third_party_producer.py"
    namespace = runpy.run_path(str(source))
    assert "example.fuse_batchnorm" in stage_kinds(), "defining the producer registers its kind"
    ckpt = tmp_path / "fused.ckpt"
    namespace["main"](["--output", str(ckpt), "--epochs", "2"])
    checkpoint = torch.load(ckpt, weights_only=True)
    assert [s["kind"] for s in checkpoint["segcompress"]["stages"]] == ["example.fuse_batchnorm"]
    assert not any(".1.running_mean" in k for k in checkpoint["state_dict"]), "the BatchNorm buffers are gone"

    # the trained, fused network's outputs, computed here from the checkpoint's weights
    expected_net = namespace["TinySegNet"]()
    for conv, bn in checkpoint["segcompress"]["stages"][0]["pairs"]:
        namespace["fold"](expected_net, conv, bn, with_weights=False)
    expected_net.load_state_dict({k[len("net."):]: v for k, v in checkpoint["state_dict"].items()})
    assert not any(isinstance(m, nn.BatchNorm2d) for m in expected_net.modules())
    x = torch.randn(2, 3, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", FRESH_PROCESS_LOAD, str(source), str(ckpt), str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected_net.eval()(x))


def test_fusing_keeps_the_outputs_and_a_failed_fuse_leaves_the_network_as_it_was():
    import pytorch_lightning as pl
    import torch

    namespace = runpy.run_path(str(EXAMPLES / "third_party_producer.py"))
    net = namespace["TinySegNet"]().eval()
    for module in net.modules():  # non-trivial statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 16, 16)
    before = net(x)
    pairs = namespace["conv_bn_pairs"](net)
    assert pairs == [["body.0", "body.1"], ["body.3", "body.4"]]
    for conv, bn in pairs:
        namespace["fold"](net, conv, bn)
    torch.testing.assert_close(net(x), before, rtol=1e-4, atol=1e-5)

    class Broken(namespace["FuseBatchNorm"]):
        def record_stage(self, network, stage):
            raise RuntimeError("disk full")

    model = namespace["Segmenter"]()
    original = {name: type(m) for name, m in model.net.named_modules()}
    images = torch.randn(8, 3, 16, 16)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, (images[:, 0] > 0).long()),
                                         batch_size=4)
    trainer = pl.Trainer(max_epochs=2, callbacks=[Broken(epoch=1)], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RuntimeError, match="disk full"):
        trainer.fit(model, loader)
    assert {name: type(m) for name, m in model.net.named_modules()} == original
    assert "_segcompress_stages" not in model.net.__dict__
