"""``runtime.channels_last``: training runs with channels-last weights and activations, and only the
floating-point summation order changes."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ncd.methods.common import RunContext
from ncd.methods.training import fit


def _strictly_channels_last(t: torch.Tensor) -> bool:
    """Channels-last strides that NCHW's are not (they coincide for one channel or a 1x1 map)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


class _Probe(L.LightningModule):
    """A conv-BN net that records, at every step, the memory format its weight and activation had."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                 nn.Linear(32, 4))
        self.formats: list[tuple[bool, bool]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        hidden = self.net[0](x)
        self.formats.append((_strictly_channels_last(self.net[0].weight), _strictly_channels_last(hidden)))
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _train(tmp_path, channels_last: bool | None) -> _Probe:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
    runtime = {"accelerator": "cpu", "threads": 1}
    if channels_last is not None:
        runtime["channels_last"] = channels_last
    ctx = RunContext("probe", 0, "probe", {"runtime": runtime}, tmp_path, tmp_path / f"out_{channels_last}")
    ctx.out_dir.mkdir()
    module = _Probe()
    fit(module, DataLoader(data, batch_size=16), ctx, epochs=3)
    return module


@pytest.mark.parametrize("channels_last", [True, False, None])
def test_channels_last_is_the_layout_of_every_step_and_off_by_default(tmp_path, channels_last):
    module = _train(tmp_path, channels_last)
    assert len(module.formats) == 12  # 3 epochs x 4 batches
    assert set(module.formats) == {(bool(channels_last), bool(channels_last))}


def test_channels_last_changes_the_summation_order_only(tmp_path):
    a, b = _train(tmp_path, True), _train(tmp_path, False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5, msg=k)
    # and the trained weights are not simply the initial ones
    assert not torch.allclose(sa["net.0.weight"], _Probe().state_dict()["net.0.weight"])
