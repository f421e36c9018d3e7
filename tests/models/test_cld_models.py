"""CLD's models: NormedLinear against its formula, the CIFAR ResNet-18 with two heads (the official
parameter counts), the ImageNet MoCo v2 + CLD model and InfoMin's jigsaw head (METHODS.md 5.2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ncd.errors import NcdError
from ncd.models import NormedLinear, model_from_arch
from ncd.models.cld import CLDModel, JigsawHead, build_cld_backbone


@pytest.mark.parametrize("fin,fout,b", [(5, 3, 4), (512, 128, 8), (16, 40, 1)])
def test_normed_linear_is_the_cosine_with_each_output_unit(fin, fout, b):
    torch.manual_seed(fin + fout)
    layer = NormedLinear(fin, fout)
    assert layer.weight.shape == (fin, fout)
    assert [n for n, _ in layer.named_parameters()] == ["weight"]  # no bias
    # initialised with unit columns
    np.testing.assert_allclose(layer.weight.detach().norm(dim=0).numpy(), np.ones(fout), rtol=1e-5)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(1, fout) * 5 + 0.1)  # any column scale gives the same output
    x = torch.randn(b, fin, dtype=torch.float64)
    w = layer.weight.detach().double().numpy()
    want = (x.numpy() / np.linalg.norm(x.numpy(), axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0, keepdims=True))
    got = layer.double()(x)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-10)
    assert got.abs().max() <= 1 + 1e-9


@pytest.mark.parametrize("head,count", [("linear", 11_300_160), ("normlinear", 11_299_904)])
def test_cifar_resnet18_two_heads_match_the_official_parameter_count(head, count):
    bb, dim = build_cld_backbone("resnet18_cifar", 3, pool_len=4)
    model = CLDModel(bb, dim, 128, head)
    assert dim == 512 and sum(p.numel() for p in model.parameters()) == count
    assert isinstance(model.inst_head, nn.Linear if head == "linear" else NormedLinear)
    assert isinstance(model.backbone.maxpool, nn.Identity) and model.backbone.conv1.kernel_size == (3, 3)
    if head == "normlinear":
        return  # one forward pass is enough
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        inst, group = model(x, two_branch=True)
        assert inst.shape == group.shape == (2, 128)
        torch.testing.assert_close(inst.norm(dim=1), torch.ones(2))
        torch.testing.assert_close(group.norm(dim=1), torch.ones(2))
        model.eval()
        only = model(x, two_branch=False)
        assert isinstance(only, torch.Tensor) and only.shape == (2, 128)
        both = model(x)
        torch.testing.assert_close(only, both[0])
        assert not torch.allclose(both[0], both[1])  # separate heads


def test_pool_len_is_a_fixed_window():
    """STL-10 (96×96) with pool_len 7: layer4 is 12×12 and the window keeps its top-left 7×7,
    as CLD's F.avg_pool2d(out, 7) does."""
    bb, dim = build_cld_backbone("resnet18_cifar", 3, pool_len=7)
    bb.eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        out = bb(x)
        fmap = bb.layer4(bb.layer3(bb.layer2(bb.layer1(torch.relu(bb.bn1(bb.conv1(x)))))))
    assert fmap.shape[-2:] == (12, 12) and out.shape == (1, 512)
    torch.testing.assert_close(out, fmap[:, :, :7, :7].mean(dim=(2, 3)))
    with pytest.raises(NcdError, match="pool_len applies to the resnet18_cifar backbone only"):
        build_cld_backbone("small_cnn", 1, pool_len=4)


@pytest.mark.parametrize("head", ["linear", "normlinear"])
def test_imagenet_mocov2_model(head):
    bb, dim = build_cld_backbone("resnet50", 3)
    model = CLDModel(bb, dim, 128, head, mlp=True)
    trunk = 23_508_032  # torchvision ResNet-50 without fc
    heads = 2 * (2048 * 128 + (128 if head == "linear" else 0))
    assert dim == 2048
    assert sum(p.numel() for p in model.parameters()) == trunk + 2048 * 2048 + 2048 + heads
    assert isinstance(model.mlp[0], nn.Linear) and isinstance(model.mlp[1], nn.ReLU)
    if head == "linear":
        return  # one forward pass is enough
    model.eval()
    with torch.no_grad():
        inst, group = model(torch.randn(2, 3, 32, 32))
    assert inst.shape == group.shape == (2, 128)
    torch.testing.assert_close(inst.norm(dim=1), torch.ones(2))


def test_infomin_jigsaw_head_shapes_kinds_and_no_mixing_between_images():
    bb, dim = build_cld_backbone("small_cnn", 3, width=8, pool=1)
    model = CLDModel(bb, dim, 16, "normlinear", mlp=True, jigsaw=True)
    assert isinstance(model.jigsaw_head.fc2, NormedLinear)  # "normmlp"
    assert isinstance(CLDModel(bb, dim, 16, "linear", mlp=True, jigsaw=True).jigsaw_head.fc2, nn.Linear)  # "mlp"
    model.eval()
    a, b, c = torch.randn(9, 3, 16, 16), torch.randn(9, 3, 16, 16), torch.randn(9, 3, 16, 16)
    torch.manual_seed(0)
    ab = model.forward_jigsaw(torch.cat([a, b]))
    torch.manual_seed(0)
    ac = model.forward_jigsaw(torch.cat([a, c]))
    assert ab.shape == (2, 16)
    torch.testing.assert_close(ab.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(ab[0], ac[0])  # an image's feature only depends on its own patches
    assert not torch.allclose(ab[1], ac[1])
    with pytest.raises(NcdError, match="multiple of 9"):
        model.forward_jigsaw(torch.randn(10, 3, 16, 16))
    with pytest.raises(NcdError, match="no jigsaw head"):
        CLDModel(bb, dim).forward_jigsaw(a)


def test_jigsaw_head_permutes_patches_within_each_image():
    head = JigsawHead(4, 4, "linear", k=3)
    with torch.no_grad():  # fc1 = identity, fc2 sums the three patch slots: invariant to the order
        head.fc1.weight.copy_(torch.eye(4))
        head.fc1.bias.zero_()
        head.fc2.weight.copy_(torch.cat([torch.eye(4)] * 3, dim=1))
        head.fc2.bias.zero_()
    x = torch.randn(6, 4)
    out = head(x)
    want = torch.nn.functional.normalize(x.view(2, 3, 4).sum(1), dim=1)
    torch.testing.assert_close(out, want)


def test_model_from_arch_rebuilds_a_cld_checkpoint():
    arch = {"kind": "cld", "backbone": "small_cnn", "in_channels": 1, "backbone_kwargs": {"width": 8, "pool": 2},
            "pool_len": 0, "low_dim": 32, "head": "normlinear", "mlp": False, "jigsaw": False}
    model = model_from_arch(arch)
    assert isinstance(model, CLDModel) and isinstance(model.group_head, NormedLinear)
    model.load_state_dict(model_from_arch(arch).state_dict())
    with pytest.raises(NcdError, match="unknown CLD head 'cosine'"):
        model_from_arch({**arch, "head": "cosine"})
