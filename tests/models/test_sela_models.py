"""SeLa's AlexNet, the timm pre-activation ResNet-50 with SeLa's options, and the multi-head model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ncd.checkpoint import load_model, load_state_strict, save_model
from ncd.errors import NcdError
from ncd.models import build_backbone, model_from_arch
from ncd.models.sela import ALEXNET_WIDTHS, SeLaAlexNet, SeLaModel, sela_resnetv2_50

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py



@pytest.mark.parametrize("size", ["big", "small"])
def test_alexnet_layers_and_output(size):
    torch.manual_seed(0)
    m = SeLaAlexNet(size)
    convs = [x for x in m.features if isinstance(x, nn.Conv2d)]
    assert [c.out_channels for c in convs] == list(ALEXNET_WIDTHS[size])
    assert [(c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == [(11, 4, 2), (5, 1, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1)]
    assert all(c.bias is not None for c in convs)  # the convs keep their bias under BN, as upstream
    layers = list(m.features)
    for i, layer in enumerate(layers):  # BatchNorm then ReLU right after every conv
        if isinstance(layer, nn.Conv2d):
            assert isinstance(layers[i + 1], nn.BatchNorm2d) and isinstance(layers[i + 2], nn.ReLU)
    assert sum(isinstance(x, nn.MaxPool2d) for x in layers) == 3
    drops = [x for x in m.classifier if isinstance(x, nn.Dropout)]
    lins = [x for x in m.classifier if isinstance(x, nn.Linear)]
    assert [d.p for d in drops] == [0.5, 0.5]
    assert [(lin.in_features, lin.out_features) for lin in lins] == [(9216, 4096), (4096, 4096)]
    m.eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 4096) and (out >= 0).all()  # ends with ReLU


def test_alexnet_init_is_the_official():
    torch.manual_seed(0)
    m = SeLaAlexNet("big")
    for c in (x for x in m.features if isinstance(x, nn.Conv2d)):
        want = math.sqrt(2.0 / (c.kernel_size[0] * c.kernel_size[1] * c.out_channels))
        assert float(c.weight.detach().std()) == pytest.approx(want, rel=0.1)
        assert float(c.bias.abs().max()) == 0.0
    for b in (x for x in m.features if isinstance(x, nn.BatchNorm2d)):
        assert torch.all(b.weight == 1) and torch.all(b.bias == 0)
    for lin in (x for x in m.classifier if isinstance(x, nn.Linear)):
        assert float(lin.weight.detach().std()) == pytest.approx(0.01, rel=0.05)
        assert float(lin.bias.abs().max()) == 0.0


def test_alexnet_rejects_other_sizes():
    with pytest.raises(NcdError, match="224x224"):
        SeLaAlexNet("small")(torch.randn(1, 3, 64, 64))
    with pytest.raises(NcdError, match="unknown AlexNet size"):
        SeLaAlexNet("huge")


def _bns(m: nn.Module) -> int:
    return sum(isinstance(x, nn.BatchNorm2d) for x in m.modules())


def test_resnetv2_50_matches_selas_network():
    """timm's resnetv2_50 is SeLa's pre-activation ResNet-50 up to its final norm and its init."""
    torch.manual_seed(0)
    sela, dim = sela_resnetv2_50()
    timm_default, _ = sela_resnetv2_50(final_norm=True, init="timm")
    assert dim == 2048
    # SeLa: 7x7/2 stem conv with 64 channels and no norm, 3/2 max-pool
    conv, pool = sela.stem.conv, sela.stem.pool
    assert (conv.kernel_size, conv.stride, conv.padding, conv.out_channels) == ((7, 7), (2, 2), (3, 3), 64)
    assert conv.bias is None and (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    assert [len(s.blocks) for s in sela.stages] == [3, 4, 6, 3]
    # three pre-activation BatchNorms per bottleneck and none after the last block; timm adds one
    assert _bns(sela) == 16 * 3 and _bns(timm_default) == 16 * 3 + 1
    assert isinstance(sela.norm, nn.Identity) and not isinstance(timm_default.norm, nn.Identity)
    # the stride sits in the 3x3 conv; projection shortcuts are plain 1x1 convs
    blk = sela.stages[1].blocks[0]
    assert blk.conv2.stride == (2, 2) and blk.conv1.stride == (1, 1)
    assert blk.downsample.conv.kernel_size == (1, 1) and blk.downsample.conv.stride == (2, 2)
    sela.eval()
    timm_default.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f_sela, f_timm = sela(x), timm_default(x)
    assert f_sela.shape == f_timm.shape == (2, 2048)
    # SeLa's features are pooled raw residual sums (negative entries); timm's pass a final ReLU
    assert (f_sela < 0).any() and (f_timm >= 0).all()
    n_params = sum(p.numel() for p in sela.parameters())
    assert sum(p.numel() for p in timm_default.parameters()) == n_params + 2 * 2048


def test_resnetv2_50_init_option():
    torch.manual_seed(0)
    torch_init, _ = sela_resnetv2_50(init="torch")
    timm_init, _ = sela_resnetv2_50(init="timm")
    conv_t, conv_m = torch_init.stages[2].blocks[0].conv2, timm_init.stages[2].blocks[0].conv2
    fan_in = conv_t.weight[0].numel()
    # PyTorch's default: kaiming_uniform(a=√5), |w| <= 1/√fan_in; timm: Kaiming normal on fan-out
    assert float(conv_t.weight.detach().abs().max()) <= 1 / math.sqrt(fan_in) + 1e-6
    fan_out = conv_m.out_channels * conv_m.kernel_size[0] * conv_m.kernel_size[1]
    assert float(conv_m.weight.detach().std()) == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
    with pytest.raises(NcdError, match="init"):
        sela_resnetv2_50(init="xavier")


def test_build_backbone_names():
    m, dim = build_backbone("sela_alexnet", 3, size="small")
    assert isinstance(m, SeLaAlexNet) and dim == 4096
    assert m.features[0].out_channels == 64
    r, dim = build_backbone("sela_resnetv2_50", 1)
    assert dim == 2048 and r.stem.conv.in_channels == 1 and isinstance(r.norm, nn.Identity)


@pytest.mark.parametrize("head_init", ["sela", "default"])
def test_sela_model_heads_and_label_matrix_round_trip(tmp_path, head_init):
    torch.manual_seed(0)
    bb, dim = build_backbone("small_cnn", 1, width=4, pool=1)
    m = SeLaModel(bb, dim, num_heads=3, num_clusters=5, num_samples=11, head_init=head_init)
    assert len(m.heads) == 3 and all(h.in_features == dim and h.out_features == 5 for h in m.heads)
    if head_init == "sela":
        assert all(float(h.bias.abs().max()) == 0 for h in m.heads)
        assert float(torch.cat([h.weight.detach().flatten() for h in m.heads]).std()) == pytest.approx(0.01, rel=0.5)
    x = torch.randn(4, 1, 8, 8)
    m.eval()
    logits = m(x)
    feats, logits2 = m.features_and_logits(x)
    assert logits.shape == (3, 4, 5) and feats.shape == (4, dim) and torch.allclose(logits, logits2)
    m.labels.copy_(torch.randint(0, 5, (3, 11)))
    arch = {"kind": "sela", "backbone": "small_cnn", "in_channels": 1, "backbone_kwargs": {"width": 4, "pool": 1},
            "num_heads": 3, "num_clusters": 5, "num_samples": 11, "head_init": head_init}
    save_model(tmp_path / "m.ckpt", m.state_dict(), arch)
    blob = load_model(tmp_path / "m.ckpt", expected={"kind": "sela"})
    assert torch.equal(blob["state_dict"]["labels"], m.labels)  # the label matrix is in the checkpoint
    m2 = model_from_arch(blob["arch"])
    load_state_strict(m2, blob["state_dict"], "test")
    m2.eval()
    assert torch.equal(m2.labels, m.labels) and torch.allclose(m2(x), logits)


def test_sela_model_rejects_bad_sizes():
    bb, dim = build_backbone("small_cnn", 1, width=4, pool=1)
    with pytest.raises(NcdError, match="num_heads"):
        SeLaModel(bb, dim, 0, 5, 10)
    with pytest.raises(NcdError, match="head_init"):
        SeLaModel(bb, dim, 1, 5, 10, head_init="zeros")
