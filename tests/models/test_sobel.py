"""ResNet18withSobel (METHODS.md 6.2), its small digits variant, the two-stage models and their
rebuild from a checkpoint's arch block."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import ncd.models
from ncd.errors import NcdError
from ncd.models import ResNet18withSobel, model_from_arch
from ncd.models.sobel import SuperANDModel, TwoStageModel


def test_parameter_count_and_frozen_sobel():
    m = ResNet18withSobel()
    total = sum(p.numel() for p in m.parameters())
    frozen = [p for p in m.parameters() if not p.requires_grad]
    assert total == 22_468_312
    assert sum(p.numel() for p in frozen) == 24
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 22_468_288
    # the frozen ones are exactly the grayscale 1x1 and the Sobel 3x3 convolutions
    assert {id(p) for p in frozen} == {id(p) for p in m.sobel.parameters()}
    # the trunks are the shared CIFAR ResNet-18, not a copy of it
    from ncd.models.resnet import ResNetSmallImages

    assert isinstance(m.trunk, ResNetSmallImages) and isinstance(m.trunk_sobel, ResNetSmallImages)
    assert m.trunk_sobel.conv1.in_channels == 2 and m.linear.in_features == 1024 and m.linear.out_features == 128


def test_sobel_input_is_grayscale_then_sobel_xy():
    m = ResNet18withSobel(in_channels=3, backbone="small_cnn", backbone_kwargs={"width": 4, "pool": 1})
    x = torch.randn(2, 3, 9, 9)
    gray = x.mean(1, keepdim=True)
    kx = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]])
    ky = torch.tensor([[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]])
    want = F.conv2d(gray, torch.stack([kx, ky]).unsqueeze(1), padding=1)
    torch.testing.assert_close(m.sobel(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels,size", [(3, 32), (1, 8)])
def test_forward_gives_unit_embeddings(channels, size):
    m = ResNet18withSobel(low_dim=16, in_channels=channels, backbone="small_cnn", backbone_kwargs={"width": 4, "pool": 2})
    out = m(torch.randn(3, channels, size, size))
    assert out.shape == (3, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_resnet18_with_sobel_forward_on_cifar_size():
    m = ResNet18withSobel().eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 128)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_twostage_model_heads_are_fixed_buffers():
    enc = ResNet18withSobel(low_dim=8, in_channels=1, backbone="small_cnn", backbone_kwargs={"width": 4, "pool": 1})
    m = TwoStageModel(enc, num_classes=3, num_heads=4)
    assert "head_weights" in dict(m.named_buffers()) and "head_weights" not in dict(m.named_parameters())
    assert m.head_weights.shape == (4, 8, 3)
    probs = m(torch.randn(5, 1, 8, 8))
    assert probs.shape == (4, 5, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 5))
    f = m.encoder(torch.randn(5, 1, 8, 8))
    torch.testing.assert_close(m.heads(f)[2], ncd.models.normalized_fc(f, m.head_weights[2], 0.1, "row"))


def test_superand_model_memory_initialisation():
    enc = ResNet18withSobel(low_dim=12, in_channels=1, backbone="small_cnn", backbone_kwargs={"width": 4, "pool": 1})
    m = SuperANDModel(enc, memory_size=500)
    s = 1 / np.sqrt(12 / 3)
    assert m.memory.shape == (500, 12) and float(m.memory.abs().max()) <= s
    assert float(m.memory.min()) < -0.8 * s and float(m.memory.max()) > 0.8 * s  # uniform over [-s, s]


@pytest.mark.parametrize("kind", ["superand", "twostage"])
def test_model_from_arch_roundtrip(kind):
    arch = {"kind": kind, "backbone": "small_cnn", "in_channels": 1, "backbone_kwargs": {"width": 4, "pool": 1},
            "low_dim": 8, "memory_size": 20, "num_classes": 3, "num_heads": 2, "head_temperature": 0.1,
            "normalize": "column"}
    a = model_from_arch(arch)
    b = model_from_arch(arch)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(a(x), b(x))
    if kind == "twostage":
        assert b.normalize == "column" and b(x).shape == (2, 2, 3)
    else:
        assert b.memory.shape == (20, 8)


def test_bad_arguments_are_named():
    with pytest.raises(NcdError, match="low_dim must be >= 1"):
        ResNet18withSobel(low_dim=0)
    with pytest.raises(NcdError, match="unknown backbone"):
        ResNet18withSobel(backbone="nope")
    enc = ResNet18withSobel(low_dim=4, in_channels=1, backbone="small_cnn", backbone_kwargs={"width": 2, "pool": 1})
    with pytest.raises(NcdError, match="num_heads and num_classes must be >= 1"):
        TwoStageModel(enc, num_classes=0)
