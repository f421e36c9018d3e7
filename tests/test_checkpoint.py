"""Model checkpoints: safe format, atomic writes, architecture checks, strict state loading."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from ncd.checkpoint import load_model, load_state_strict, save_model, sub_state
from ncd.errors import NcdError
from ncd.models import model_from_arch

ARCH = {"kind": "contrastive", "backbone": "small_cnn", "in_channels": 1,
        "backbone_kwargs": {"width": 4, "pool": 1}, "head": "mlp", "features_dim": 8}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return model_from_arch(ARCH)


def test_save_model_is_weights_only_loadable(tmp_path):
    m = _model()
    path = tmp_path / "sub" / "model.ckpt"   # the parent folder is created
    meta = {"experiment": "scan_digits", "seed": 3, "best_head": 1, "loss": 0.25, "tags": ["a", "b"]}
    save_model(path, m.state_dict(), ARCH, meta)
    assert path.is_file()
    blob = torch.load(path, weights_only=True)
    assert set(blob) == {"arch", "state_dict", "meta"}
    assert blob["arch"] == ARCH
    assert blob["meta"] == meta
    sd = m.state_dict()
    assert set(blob["state_dict"]) == set(sd)
    for k, v in sd.items():
        assert torch.equal(blob["state_dict"][k], v)
    # only the checkpoint is left: no temporary files next to it
    assert [p.name for p in path.parent.iterdir()] == ["model.ckpt"]


def test_save_model_copies_and_detaches(tmp_path):
    w = torch.ones(3, requires_grad=True)
    state = {"w": w * 2}
    save_model(tmp_path / "m.ckpt", state, {"kind": "x", "backbone": "b", "in_channels": 1})
    blob = load_model(tmp_path / "m.ckpt")
    assert blob["meta"] == {}
    assert not blob["state_dict"]["w"].requires_grad
    assert torch.equal(blob["state_dict"]["w"], torch.full((3,), 2.0))


def test_load_model_round_trip_into_model(tmp_path):
    m = _model()
    save_model(tmp_path / "model.ckpt", m.state_dict(), ARCH, {"seed": 0})
    blob = load_model(tmp_path / "model.ckpt", expected={"kind": "contrastive", "backbone": "small_cnn",
                                                         "in_channels": 1})
    m2 = model_from_arch(blob["arch"])
    load_state_strict(m2, blob["state_dict"], "round trip")
    m.eval()
    m2.eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(m(x), m2(x))


def test_load_model_expected_mismatch_names_both(tmp_path):
    arch = {**ARCH, "backbone": "resnet18_cifar"}
    path = tmp_path / "model.ckpt"
    save_model(path, {"w": torch.zeros(1)}, arch)
    with pytest.raises(NcdError) as ei:
        load_model(path, expected={"backbone": "small_cnn"})
    msg = str(ei.value)
    assert "resnet18_cifar" in msg and "small_cnn" in msg and "backbone" in msg
    assert str(path) in msg

    with pytest.raises(NcdError) as ei:
        load_model(path, expected={"kind": "clustering"})
    assert "contrastive" in str(ei.value) and "clustering" in str(ei.value)

    with pytest.raises(NcdError) as ei:
        load_model(path, expected={"in_channels": 3})
    assert "in_channels" in str(ei.value) and "3" in str(ei.value)

    # matching expectations pass
    assert load_model(path, expected={"backbone": "resnet18_cifar", "kind": "contrastive"})["arch"] == arch


def test_load_model_missing_file(tmp_path):
    with pytest.raises(NcdError, match="does not exist"):
        load_model(tmp_path / "nothere.ckpt")
    # a folder is not a checkpoint either
    with pytest.raises(NcdError):
        load_model(tmp_path)


def test_load_model_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(NcdError) as ei:
        load_model(text)
    assert str(text) in str(ei.value)

    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(NcdError):
        load_model(empty)


def test_load_model_foreign_torch_file(tmp_path):
    other = tmp_path / "other.ckpt"
    torch.save({"model": {"w": torch.zeros(2)}}, other)   # e.g. someone else's checkpoint
    with pytest.raises(NcdError, match="arch"):
        load_model(other)
    plain = tmp_path / "tensor.ckpt"
    torch.save(torch.zeros(3), plain)
    with pytest.raises(NcdError):
        load_model(plain)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_load_model_refuses_arbitrary_pickles(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"arch": {}, "state_dict": {}, "x": _Evil()}, f, protocol=2)
    with pytest.raises(NcdError):
        load_model(path)
    assert "unpickled arbitrary code" not in capsys.readouterr().out


def test_load_model_fills_missing_meta(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"arch": dict(ARCH), "state_dict": {}}, path)
    assert load_model(path)["meta"] == {}


def test_load_state_strict_missing_keys():
    lin = nn.Linear(2, 3)
    with pytest.raises(NcdError) as ei:
        load_state_strict(lin, {"weight": torch.zeros(3, 2)}, "my checkpoint")
    msg = str(ei.value)
    assert "my checkpoint" in msg and "missing" in msg and "bias" in msg


def test_load_state_strict_unexpected_keys():
    lin = nn.Linear(2, 3)
    state = {"weight": torch.zeros(3, 2), "bias": torch.zeros(3), "extra.thing": torch.zeros(1)}
    with pytest.raises(NcdError) as ei:
        load_state_strict(lin, state, "pretext backbone")
    msg = str(ei.value)
    assert "pretext backbone" in msg and "unexpected" in msg and "extra.thing" in msg
    assert "missing" not in msg


def test_load_state_strict_both_and_ok():
    lin = nn.Linear(2, 3)
    with pytest.raises(NcdError) as ei:
        load_state_strict(lin, {"weight": torch.zeros(3, 2), "foo": torch.zeros(1)}, "x")
    assert "missing" in str(ei.value) and "unexpected" in str(ei.value)
    load_state_strict(lin, {"weight": torch.ones(3, 2), "bias": torch.full((3,), 2.0)}, "x")
    assert torch.equal(lin.weight.data, torch.ones(3, 2))
    assert torch.equal(lin.bias.data, torch.full((3,), 2.0))


def test_sub_state():
    sd = {"backbone.a": torch.zeros(1), "backbone.b.c": torch.ones(1), "head.w": torch.zeros(2),
          "backbonex.d": torch.zeros(1)}
    out = sub_state(sd, "backbone")
    assert set(out) == {"a", "b.c"}


def test_crash_during_save_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="simulated"):
        save_model(path, {"w": torch.zeros(2)}, ARCH)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    save_model(path, {"w": torch.zeros(2)}, ARCH, {"version": 1})
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_model(path, {"w": torch.ones(2)}, ARCH, {"version": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_model(path)["meta"] == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["model.ckpt"]
