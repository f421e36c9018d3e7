"""The architecture registry behind model_from_arch, the shared NPID memory initialisation, and the
layering of the packages below ncd.methods (ops ← losses, models, data)."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import ncd.methods.cld_probe  # noqa: F401  a method module registers its own kind at import (linear_probe)
import ncd.models as models
from ncd.errors import NcdError
from ncd.models import ARCHITECTURES, model_from_arch, register_architecture
from ncd.ops import npid_memory_init

KINDS = ["contrastive", "clustering", "uno", "sela", "superand", "twostage", "cld", "linear_probe"]
NCD = Path(models.__file__).resolve().parents[1]


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so that a test's kinds do not leak into the others."""
    monkeypatch.setattr(models, "ARCHITECTURES", dict(ARCHITECTURES))
    return models.ARCHITECTURES


def test_every_checkpoint_kind_has_a_builder_and_unknown_kinds_are_listed():
    assert list(ARCHITECTURES) == KINDS
    with pytest.raises(NcdError) as e:
        model_from_arch({"kind": "weird", "backbone": "small_cnn", "in_channels": 1})
    assert str(e.value) == ("checkpoint architecture kind 'weird' has no model; expected 'contrastive', 'clustering', "
                            "'uno', 'sela', 'superand', 'twostage', 'cld' or 'linear_probe'")


def test_a_method_registers_its_own_kind(registry):
    def build(arch: dict) -> nn.Module:
        return nn.Linear(arch["in"], 2)

    register_architecture("probe", build)
    register_architecture("probe", build)  # the same builder again: a no-op (a module imported twice)
    model = model_from_arch({"kind": "probe", "in": 3})
    assert isinstance(model, nn.Linear) and model.in_features == 3
    with pytest.raises(NcdError, match="expected .*'linear_probe' or 'probe'"):
        model_from_arch({"kind": "nope"})
    with pytest.raises(NcdError, match="'probe' is already registered"):
        register_architecture("probe", lambda arch: nn.Identity())
    with pytest.raises(NcdError, match="must be callable"):
        register_architecture("other", None)
    assert "probe" not in ARCHITECTURES  # the module's own registry is untouched by the fixture's copy


@pytest.mark.parametrize("n,d", [(1, 1), (500, 12), (7, 128), (3, 6595)])
def test_npid_memory_init_draws_what_both_official_inits_draw(n, d):
    """One torch.rand(n, d) draw, uniform in [-s, s], s = 1/sqrt(d/3): bit for bit the numbers of
    Super-AND's ``(d/3) ** 0.5`` form and of CLD's ``math.sqrt`` form, and the generator left alike."""
    torch.manual_seed(d)
    got, after = npid_memory_init(n, d), torch.rand(2)
    torch.manual_seed(d)
    stdv = 1.0 / (d / 3) ** 0.5
    superand = torch.rand(n, d).mul_(2 * stdv).add_(-stdv)
    torch.manual_seed(d)
    s = 1.0 / math.sqrt(d / 3)
    cld = torch.rand(n, d) * (2 * s) - s
    assert torch.equal(got, superand) and torch.equal(got, cld) and torch.equal(after, torch.rand(2))
    assert got.shape == (n, d) and float(got.abs().max()) <= s


def _ncd_imports(package: str) -> list[tuple[str, int, str, bool]]:
    """(file, line, imported ncd module, inside a function) for every ncd import of a package."""
    found = []
    for path in sorted((NCD / package).rglob("*.py")):
        tree = ast.parse(path.read_text())
        in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f) if n is not f}
        for node in ast.walk(tree):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name == "ncd" or name.startswith("ncd."):
                    found.append((path.name, node.lineno, name, id(node) in in_function))
    return found


@pytest.mark.parametrize("package,allowed", [
    ("ops", ("ncd.errors", "ncd.ops")),
    ("losses", ("ncd.errors", "ncd.ops", "ncd.losses")),
    ("models", ("ncd.errors", "ncd.ops", "ncd.models")),
    ("data", ("ncd.errors", "ncd.ops", "ncd.data", "ncd.utils")),
    ("eval", ("ncd.errors", "ncd.ops", "ncd.eval", "ncd.utils", "ncd.stages")),  # nothing from methods
])
def test_layers_import_only_downwards_and_at_module_level(package, allowed):
    imports = _ncd_imports(package)
    assert imports
    wrong = [i for i in imports if not any(i[2] == a or i[2].startswith(a + ".") for a in allowed)]
    assert not wrong, f"ncd.{package} imports above its layer: {wrong}"
    local = [i for i in imports if i[3]]
    assert not local, f"ncd.{package} imports ncd modules inside functions: {local}"
