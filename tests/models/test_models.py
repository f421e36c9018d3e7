"""Backbones and heads: output shapes, the SCAN small-image stems, errors, arch round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ncd.errors import NcdError
from ncd.models import (
    BACKBONES,
    ClusteringModel,
    ContrastiveModel,
    ResNetSmallImages,
    SmallCNN,
    build_backbone,
    model_from_arch,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny forward passes; tests/conftest.py


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


# --- backbones --------------------------------------------------------------------------------

@pytest.mark.parametrize("pool", [1, 2])
@pytest.mark.parametrize("width", [8, 32])
def test_small_cnn_digits_shapes(pool, width):
    m, dim = build_backbone("small_cnn", in_channels=1, width=width, pool=pool)
    assert isinstance(m, SmallCNN)
    assert dim == m.out_dim == 2 * width * pool * pool
    out = _features(m, torch.randn(3, 1, 8, 8))
    assert out.shape == (3, dim)
    assert torch.isfinite(out).all()


def test_small_cnn_defaults_and_32px():
    m, dim = build_backbone("small_cnn")  # 3 channels, width 64, pool 2
    assert dim == 2 * 64 * 2 * 2
    assert _features(m, torch.randn(2, 3, 32, 32)).shape == (2, dim)
    # only one MaxPool (after the second conv block) and an adaptive pool to pool x pool cells
    pools = [mod for mod in m.modules() if isinstance(mod, nn.MaxPool2d)]
    assert len(pools) == 1
    adaptive = [mod for mod in m.modules() if isinstance(mod, nn.AdaptiveAvgPool2d)]
    assert len(adaptive) == 1 and adaptive[0].output_size in (2, (2, 2))


def test_small_cnn_keeps_spatial_information():
    """pool=2 keeps a 2x2 grid: images that differ only in where the ink is give different features."""
    m, _ = build_backbone("small_cnn", in_channels=1, width=8, pool=2)
    x = torch.zeros(2, 1, 8, 8)
    x[0, 0, :4, :4] = 1.0   # ink top-left
    x[1, 0, 4:, 4:] = 1.0   # ink bottom-right
    f = _features(m, x)
    assert not torch.allclose(f[0], f[1])


def test_resnet18_cifar_shape_and_stem():
    m, dim = build_backbone("resnet18_cifar")
    assert isinstance(m, ResNetSmallImages) and dim == 512
    assert _features(m, torch.randn(2, 3, 32, 32)).shape == (2, 512)
    # SCAN's CIFAR stem: a 3x3 stride-1 conv, no max-pool, adaptive global average pool
    assert isinstance(m.conv1, nn.Conv2d)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and m.conv1.padding == (1, 1)
    assert m.conv1.in_channels == 3 and m.conv1.out_channels == 64 and m.conv1.bias is None
    assert not any(isinstance(mod, nn.MaxPool2d) for mod in m.modules())
    assert isinstance(m.avgpool, nn.AdaptiveAvgPool2d)
    # ResNet-18: 2 BasicBlocks per stage
    assert [len(layer) for layer in (m.layer1, m.layer2, m.layer3, m.layer4)] == [2, 2, 2, 2]


def test_resnet18_cifar_other_channels_and_sizes():
    m, dim = build_backbone("resnet18_cifar", in_channels=1)
    assert m.conv1.in_channels == 1
    # adaptive pool: works at any size
    assert _features(m, torch.randn(2, 1, 8, 8)).shape == (2, dim)


def test_resnet18_stl_shape_and_stem():
    m, dim = build_backbone("resnet18_stl")
    assert isinstance(m, ResNetSmallImages) and dim == 512
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert isinstance(m.maxpool, nn.MaxPool2d)
    ks = m.maxpool.kernel_size
    st = m.maxpool.stride
    pad = m.maxpool.padding
    assert (ks, st, pad) in {(2, 2, 1), ((2, 2), (2, 2), (1, 1))}
    assert isinstance(m.avgpool, nn.AvgPool2d)
    assert m.avgpool.kernel_size in (7, (7, 7))
    assert m.avgpool.stride in (1, (1, 1))
    out = _features(m, torch.randn(1, 3, 96, 96))
    assert out.shape == (1, 512)
    # the fixed AvgPool(7) is sized for 96x96 inputs: a 64x64 image leaves a 5x5 map, too small
    with pytest.raises(RuntimeError):
        _features(m, torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("name,dim", [("resnet18", 512), ("resnet50", 2048)])
def test_torchvision_backbones(name, dim):
    m, d = build_backbone(name)
    assert d == dim
    assert isinstance(m.fc, nn.Identity)
    assert _features(m, torch.randn(2, 3, 32, 32)).shape == (2, dim)


def test_torchvision_backbone_one_channel():
    m, d = build_backbone("resnet18", in_channels=1)
    assert m.conv1.in_channels == 1
    assert _features(m, torch.randn(2, 1, 32, 32)).shape == (2, d)


def test_timm_backbone():
    m, d = build_backbone("timm:resnet18")
    assert d == 512
    assert _features(m, torch.randn(2, 3, 32, 32)).shape == (2, 512)
    m1, d1 = build_backbone("timm:resnet18", in_channels=1)
    assert _features(m1, torch.randn(2, 1, 32, 32)).shape == (2, d1)


def test_unknown_backbone():
    with pytest.raises(NcdError) as ei:
        build_backbone("vgg_nosuch")
    msg = str(ei.value)
    assert "vgg_nosuch" in msg
    for name in ("small_cnn", "resnet18_cifar", "resnet18_stl", "resnet50"):
        assert name in msg
    assert "small_cnn" in BACKBONES


def test_unknown_timm_model():
    with pytest.raises(NcdError, match="nosuchmodel_xyz"):
        build_backbone("timm:nosuchmodel_xyz")


# --- heads ------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_contrastive_model_unit_norm(head):
    bb, dim = build_backbone("small_cnn", in_channels=1, width=8, pool=2)
    m = ContrastiveModel(bb, dim, head=head, features_dim=16)
    out = _features(m, torch.randn(5, 1, 8, 8))
    assert out.shape == (5, 16)
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-5)


def test_contrastive_model_mlp_structure_and_identity():
    bb, dim = build_backbone("small_cnn", in_channels=1, width=8, pool=1)
    m = ContrastiveModel(bb, dim, head="mlp", features_dim=12)
    layers = list(m.contrastive_head)
    assert isinstance(layers[0], nn.Linear) and (layers[0].in_features, layers[0].out_features) == (dim, dim)
    assert isinstance(layers[1], nn.ReLU)
    assert isinstance(layers[2], nn.Linear) and (layers[2].in_features, layers[2].out_features) == (dim, 12)
    ident = ContrastiveModel(bb, dim, head="identity")
    out = _features(ident, torch.randn(4, 1, 8, 8))
    assert out.shape == (4, dim)
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)


def test_contrastive_model_unknown_head():
    bb, dim = build_backbone("small_cnn", in_channels=1, width=8)
    with pytest.raises(NcdError, match="nosuchhead"):
        ContrastiveModel(bb, dim, head="nosuchhead")


def test_clustering_model_shapes_and_passes():
    bb, dim = build_backbone("small_cnn", in_channels=1, width=8, pool=2)
    m = ClusteringModel(bb, dim, num_clusters=7, num_heads=3)
    m.eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        logits = m(x)
        assert logits.shape == (3, 4, 7)
        feats = m(x, forward_pass="backbone")
        assert feats.shape == (4, dim)
        assert torch.allclose(feats, bb(x))
        from_head = m(feats, forward_pass="head")
    assert from_head.shape == (3, 4, 7)
    assert torch.allclose(from_head, logits, atol=1e-6)
    # the heads are independent: different weights, different logits
    assert not torch.allclose(logits[0], logits[1])
    assert len(m.cluster_head) == 3
    assert all(isinstance(h, nn.Linear) and h.in_features == dim and h.out_features == 7
               for h in m.cluster_head)


def test_clustering_model_single_head():
    bb, dim = build_backbone("small_cnn", in_channels=1, width=8, pool=1)
    m = ClusteringModel(bb, dim, num_clusters=10)
    assert _features(m, torch.randn(2, 1, 8, 8)).shape == (1, 2, 10)


# --- model_from_arch ---------------------------------------------------------------------------

def test_model_from_arch_round_trip_contrastive():
    arch = {"kind": "contrastive", "backbone": "small_cnn", "in_channels": 1,
            "backbone_kwargs": {"width": 8, "pool": 2}, "head": "mlp", "features_dim": 16}
    m1 = model_from_arch(arch)
    assert isinstance(m1, ContrastiveModel)
    m2 = model_from_arch(arch)
    m2.load_state_dict(m1.state_dict(), strict=True)
    x = torch.randn(3, 1, 8, 8)
    a, b = _features(m1, x), _features(m2, x)
    assert a.shape == (3, 16)
    assert torch.allclose(a, b)


def test_model_from_arch_round_trip_clustering():
    arch = {"kind": "clustering", "backbone": "small_cnn", "in_channels": 1,
            "backbone_kwargs": {"width": 8, "pool": 1}, "num_clusters": 5, "num_heads": 2}
    m1 = model_from_arch(arch)
    assert isinstance(m1, ClusteringModel)
    m2 = model_from_arch(arch)
    m2.load_state_dict(m1.state_dict(), strict=True)
    x = torch.randn(3, 1, 8, 8)
    a, b = _features(m1, x), _features(m2, x)
    assert a.shape == (2, 3, 5)
    assert torch.allclose(a, b)


def test_model_from_arch_contrastive_state_feeds_clustering_backbone():
    """SCAN's hand-over: the contrastive model's ``backbone.*`` keys fit the clustering model."""
    common = {"backbone": "small_cnn", "in_channels": 1, "backbone_kwargs": {"width": 8, "pool": 2}}
    pre = model_from_arch({**common, "kind": "contrastive"})
    clu = model_from_arch({**common, "kind": "clustering", "num_clusters": 10})
    bb_state = {k[len("backbone."):]: v for k, v in pre.state_dict().items() if k.startswith("backbone.")}
    clu.backbone.load_state_dict(bb_state, strict=True)


def test_model_from_arch_unknown_kind():
    with pytest.raises(NcdError, match="weird"):
        model_from_arch({"kind": "weird", "backbone": "small_cnn", "in_channels": 1})
