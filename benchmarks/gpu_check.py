"""One command that runs every paper experiment's training path on a GPU (or, tiny, on the CPU).

    python benchmarks/gpu_check.py                         # one GPU: paper batch sizes and precision
    python benchmarks/gpu_check.py --device cpu --tiny     # every experiment at batch 4, a few minutes on 2 cores
    python benchmarks/gpu_check.py --experiments scan_cifar10 sela_cifar10 --out /tmp/check   # a subset, kept
    python benchmarks/gpu_check.py --experiments scan_cifar10 scan_stl10 --augment batched     # views on the GPU
    python benchmarks/gpu_check.py --experiments scan_cifar10 --augment batched --channels-last  # + channels-last

For every experiment of workflow/experiments/paper.yaml (its run_experiments, then the others), resolved as the
workflow resolves it, and for each stage of its method in pipeline order: the dataset is fabricated in its real
on-disk format (CIFAR pickles, STL-10 binaries, ImageNet folders of JPEGs; nothing is downloaded), and the stage
runs through its real run function, so model, augmentation, loss, optimiser and precision are the experiment's.
Changed in the slice: one epoch of a few batches (Lightning's limit_train_batches, set by this check's callback),
one device, the data-loader workers, monitors off, and with --tiny batch size 4 and ImageNet at 64 px. A training
stage is stopped after k steps by SIGUSR1 (SaveOnSignal writes last.ckpt mid-epoch and raises Preempted) and run
again with the same context: it must resume from last.ckpt, finish the epoch and write the artifact that the next
stage reads.

One line per stage on stdout: status, images/s (steady state), peak GPU memory, mean data wait and step time per
batch, bottleneck; progress and tracebacks go to stderr, each stage's log to its run folder. Then SeLa's label
step at N = 200,000, K = 3,000 (--tiny: 2,000 x 30). The last line is ``gpu_check: <n> ok, <m> failed[: ...]``
and the exit status is 1 when anything failed. Needs torch, torchvision, lightning, timm, scikit-learn, scipy
and PyYAML; the project need not be installed (the repository root is put on sys.path), faiss and jsonschema
may be missing (stand-ins below, announced in the output).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import io
import logging
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")  # the evaluation passes' progress bars (tqdm reads it at import)


def _jsonschema_stand_in() -> types.ModuleType:
    """What ncd.config needs of jsonschema when it is not installed (the GPU machine's image lacks it): a
    Draft-7 walk over properties, allOf, $ref, additionalProperties and items that fills in defaults through
    ncd.config's own hook and reports no errors. The configs are validated by the real jsonschema wherever
    the tests run (tests/test_gpu_check.py checks that both resolve every paper experiment alike)."""

    def properties(validator, props, instance, schema):
        if isinstance(instance, dict):
            for name, sub in props.items():
                if name in instance:
                    yield from validator.descend(instance[name], sub)

    def all_of(validator, subs, instance, schema):
        for sub in subs:
            yield from validator.descend(instance, sub)

    def additional(validator, sub, instance, schema):
        if isinstance(sub, dict) and isinstance(instance, dict):
            for name, value in instance.items():
                if name not in schema.get("properties", {}):
                    yield from validator.descend(value, sub)

    def items(validator, sub, instance, schema):
        if isinstance(sub, dict) and isinstance(instance, list):
            for value in instance:
                yield from validator.descend(value, sub)

    class Draft7Validator:
        VALIDATORS = {"properties": properties, "allOf": all_of, "additionalProperties": additional, "items": items}

        def __init__(self, schema: dict) -> None:
            self.schema = schema

        def iter_errors(self, instance, _schema=None):
            schema = self.schema if _schema is None else _schema
            if not isinstance(schema, dict):
                return
            if "$ref" in schema:  # draft 7: the keywords beside $ref are ignored
                node = self.schema
                for part in schema["$ref"].lstrip("#/").split("/"):
                    node = node[part]
                yield from self.iter_errors(instance, node)
                return
            for keyword, value in schema.items():
                fn = self.VALIDATORS.get(keyword)
                if fn is not None:
                    yield from fn(self, value, instance, schema) or ()

        def descend(self, instance, schema, path=None, schema_path=None):
            yield from self.iter_errors(instance, schema)

    def extend(base, validators):
        return type("Extended" + base.__name__, (base,), {"VALIDATORS": {**base.VALIDATORS, **validators}})

    mod = types.ModuleType("jsonschema")
    mod.Draft7Validator = Draft7Validator
    mod.validators = types.SimpleNamespace(extend=extend)
    mod.exceptions = types.SimpleNamespace(best_match=lambda errors: next(iter(errors)))
    mod.__gpu_check_stand_in__ = True
    return mod


try:
    import jsonschema  # noqa: F401  (ncd.config imports it)
    JSONSCHEMA_STAND_IN = False
except ImportError:
    sys.modules["jsonschema"] = _jsonschema_stand_in()
    JSONSCHEMA_STAND_IN = True

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import datasets as tvd  # noqa: E402
from torchvision.datasets.utils import calculate_md5  # noqa: E402

from ncd.config import check_stage_config, load_config, resolve_experiment, stage_slice  # noqa: E402
from ncd.data import get_info, imagenet_subset_classes  # noqa: E402
from ncd.data.uno import uno_imagenet_wnids  # noqa: E402
from ncd.errors import Preempted  # noqa: E402
from ncd.methods import common, training  # noqa: E402
from ncd.models import build_backbone  # noqa: E402
from ncd.stages import STAGES, Stage, load, stages_of  # noqa: E402
from ncd.utils import keep_freed_memory, seed_everything  # noqa: E402

PAPER = ROOT / "workflow" / "experiments" / "paper.yaml"
TINY_BATCH = 4
#: a data wait above this share of (wait + step) per batch: the data loader is the bottleneck
WAIT_SHARE = 0.2
#: ImageNet classes written for the subsets (SCAN) and for SeLa's and CLD's ImageNet
IMAGENET_CLASSES = 10
GIB = 2**30
#: --tiny: the ImageNet datasets' (Resize, crop) sides instead of (256, 224), the paper's ratio kept. A ResNet
#: step at 224 px takes seconds on 2 CPU cores and ImageNet paths are a third of the check's stages; the code
#: path does not depend on the side (ResNets pool adaptively). SeLa's presets set their own sizes: its ResNet
#: crops are shrunk alike in prepare(); AlexNet (a fixed 6x6 map) and InfoMin's jigsaw (255 px) keep theirs.
TINY_IMAGENET_SIDES = (73, 64)


class CheckError(Exception):
    """The stage ran but did not do what the check requires (stop, resume, artifact)."""


# ------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class Plan:
    device: str          # "cuda" or "cpu"
    tiny: bool
    steps: int           # k: SIGUSR1 during the k-th step of the first run, which stops at the end of that step
    augment: str = "pil"  # augment.backend of every experiment (batched: views made on the device)
    channels_last: bool = False  # runtime.channels_last of every experiment

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def batches(self, batch_size: int) -> int:
        """Batches per epoch: the stop after k batches falls mid-epoch, and the resumed run has steps left to
        time (fewer at batch sizes >= 512, whose images dominate the check's time; one at --tiny)."""
        if self.tiny:
            return self.steps + 1
        return self.steps + (3 if batch_size >= 512 else 6)

    def warmup(self, run: int) -> int:
        """Steps of a run left out of the steady-state figures (autotuning, the first batches of the workers)."""
        return 1 if self.tiny or run > 0 else 2

    def n_test(self) -> int:
        return 2 * TINY_BATCH if self.tiny else 512


def bottleneck(wait: float, step: float, device: str) -> str:
    """``data loader`` when waiting for batches takes more than WAIT_SHARE of each batch's time, else the device."""
    if wait + step > 0 and wait > WAIT_SHARE * (wait + step):
        return "data loader"
    return "GPU" if device == "cuda" else "CPU"


def shrink_imagenet_for_tiny() -> list[str]:
    """--tiny: the registry's ImageNet datasets at TINY_IMAGENET_SIDES (the Cutout length scaled alike), in this
    process only; returns the datasets changed."""
    from ncd.data import registry

    resize, crop = TINY_IMAGENET_SIDES
    changed = []
    for name, info in list(registry.DATASETS.items()):
        if name == "imagenet" or name.startswith("imagenet-"):
            registry.DATASETS[name] = dataclasses.replace(info, image_size=resize, crop_size=crop,
                                                          cutout=max(1, round(info.cutout * crop / info.crop_size)))
            changed.append(name)
    return changed


# -------------------------------------------------------------------------------- experiments
def load_paper_config() -> dict[str, Any]:
    """The workflow's config for the paper runs: config.yaml with paper.yaml merged on top, validated."""
    return load_config([ROOT / "config.yaml", PAPER])


def paper_experiments(config: dict[str, Any]) -> list[str]:
    """paper.yaml's run_experiments, then every other experiment of that file."""
    listed = list(config.get("run_experiments") or [])
    in_file = list((yaml.safe_load(PAPER.read_text()) or {}).get("experiments", {}))
    return listed + [n for n in in_file if n not in listed]


def experiment_stages(exp: dict[str, Any]) -> list[Stage]:
    """The experiment's stages in pipeline order; a ``stages_of`` that takes the config skips disabled ones."""
    try:
        takes_cfg = len(inspect.signature(stages_of).parameters) > 1
    except (TypeError, ValueError):
        takes_cfg = False
    return list(stages_of(exp["method"], exp) if takes_cfg else stages_of(exp["method"]))


def _blocks(stages: list[Stage]) -> set[str]:
    return {b for st in stages for b in st.blocks}


def _shrink_block(block: dict[str, Any], plan: Plan, notes: list[str]) -> None:
    """epochs → 1 (also of a nested probe that is on); with tiny, batch sizes → TINY_BATCH; on the CPU a
    block's own mixed precision → None (the runtime's)."""
    for b in (block, block.get("probe"), block.get("linear_probe")):
        if not isinstance(b, dict):
            continue
        if isinstance(b.get("epochs"), int) and b["epochs"] > 0:
            b["epochs"] = 1
        if plan.tiny and isinstance(b.get("batch_size"), int):
            b["batch_size"] = TINY_BATCH
        if not plan.cuda and b.get("precision") not in (None, "32-true", "32"):
            notes.append(f"precision {b['precision']} -> 32-true on the CPU")
            b["precision"] = None


Notes = dict[str, list[str]]   # config block ("" = every stage) -> what the check changed there


def prepare(config: dict[str, Any], name: str, plan: Plan) -> tuple[dict[str, Any], list[Stage], Notes]:
    """The resolved experiment with the check's overrides, its stages, and notes on what was changed."""
    exp = resolve_experiment(config, name)
    notes: Notes = {"": []}
    rt = exp["runtime"]
    rt.update(accelerator="gpu" if plan.cuda else "cpu", devices=1, num_workers=8 if plan.cuda else 0)
    if not plan.cuda and rt.get("precision") not in ("32-true", "32"):
        notes[""].append(f"precision {rt['precision']} -> 32-true on the CPU")
        rt["precision"] = "32-true"
    exp["download"] = False
    if plan.augment != (exp.get("augment") or {}).get("backend", "pil"):
        exp["augment"] = {**(exp.get("augment") or {}), "backend": plan.augment}
        notes[""].append(f"augment.backend {plan.augment}")
    if plan.channels_last:
        rt["channels_last"] = True
        notes[""].append("runtime.channels_last")
    stages = experiment_stages(exp)
    blocks = _blocks(stages)
    for b in blocks:
        if isinstance(exp.get(b), dict):
            _shrink_block(exp[b], plan, notes.setdefault(b, []))
    if "sela" in blocks:
        # label steps at the first batch and mid-epoch, the last one beyond the epoch
        exp["sela"]["nopts"] = 3 if exp["sela"]["label_schedule"] == "quadratic" else 4
        if plan.tiny and exp["backbone"] != "sela_alexnet":  # AlexNet's classifier needs its 224 px (6x6 map)
            resize, crop = TINY_IMAGENET_SIDES
            exp["sela"].setdefault("augment", {}).update(crop_size=crop, eval_resize=resize)
            notes.setdefault("sela", []).append(f"--tiny: crops of {crop} px (eval Resize {resize})")
    if "superand" in blocks:
        exp["superand"].update(rounds=2, epochs=1)  # two rounds of one epoch: round 1's anchor discovery runs
    if "selflabel" in blocks:
        # a one-epoch SCAN model is never 99 % confident: without this every batch would be skipped untrained
        exp["selflabel"]["confidence_threshold"] = 0.0
    if "cld" in blocks:
        exp["cld"]["knn_every"] = 0
    for b in ("cluster", "pretext_kmeans"):
        if b in blocks:
            exp[b]["n_init"] = 1  # k-means restarts run on the CPU: not what this check measures
    return exp, stages, notes


def stage_batch_size(exp: dict[str, Any], st: Stage) -> int:
    for b in (st.name, *st.blocks):
        block = exp.get(b)
        if b != "evaluate" and isinstance(block, dict) and isinstance(block.get("batch_size"), int):
            return int(block["batch_size"])
    return TINY_BATCH


def train_images_needed(exp: dict[str, Any], stages: list[Stage], plan: Plan) -> int:
    """Training images for every training stage to have its epoch of plan.batches(batch size) batches
    (UNO pretrains on the known classes only, at least half of the images)."""
    need = max([plan.batches(bs) * bs for bs in (stage_batch_size(exp, st) for st in stages if st.resumable)]
               or [plan.batches(TINY_BATCH) * TINY_BATCH])
    if exp["method"] == "uno":
        need = 2 * need + 2 * max(stage_batch_size(exp, st) for st in stages)
    return need


def data_key(exp: dict[str, Any]) -> str:
    """Which fabricated dataset folder an experiment reads (experiments with equal needs share one)."""
    ds = exp["dataset"]
    if ds == "cifar100-20":
        return "cifar100"
    if ds.startswith("imagenet-"):
        return "imagenet-subsets"
    if ds == "imagenet":
        return "imagenet-uno" if exp["method"] == "uno" else "imagenet"
    return ds


# ------------------------------------------------------------------------------- fabrication
def _labels(n: int, k: int) -> list[int]:
    return ((np.arange(n) * 37) % k).tolist()  # every class, spread evenly over the images


def _pickle(path: Path, obj: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    return calculate_md5(str(path))


def _cifar_rows(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # 1024 red, 1024 green, 1024 blue values per row


def write_cifar10(root: Path, n_train: int, n_test: int, rng: np.random.Generator) -> None:
    """CIFAR-10's five training pickles, test pickle and meta; torchvision's md5 lists then name them."""
    base = root / "cifar-10-batches-py"
    x, y = rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8), _labels(n_train, 10)
    md5 = {}
    for b, idx in enumerate(np.array_split(np.arange(n_train), 5), 1):
        md5[f"data_batch_{b}"] = _pickle(base / f"data_batch_{b}", {
            "batch_label": f"training batch {b} of 5", "labels": [y[i] for i in idx], "data": _cifar_rows(x[idx]),
            "filenames": [f"{i}.png" for i in idx]})
    xt = rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8)
    md5["test_batch"] = _pickle(base / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": _labels(n_test, 10),
                                                      "data": _cifar_rows(xt), "filenames": [f"{i}.png" for i in range(n_test)]})
    md5["batches.meta"] = _pickle(base / "batches.meta", {"num_cases_per_batch": 10000, "num_vis": 3072,
                                                          "label_names": [f"class{i}" for i in range(10)]})
    tvd.CIFAR10.train_list = [[f"data_batch_{b}", md5[f"data_batch_{b}"]] for b in range(1, 6)]
    tvd.CIFAR10.test_list = [["test_batch", md5["test_batch"]]]
    tvd.CIFAR10.meta = {"filename": "batches.meta", "key": "label_names", "md5": md5["batches.meta"]}


def write_cifar100(root: Path, n_train: int, n_test: int, rng: np.random.Generator) -> None:
    """CIFAR-100's train, test and meta pickles (fine labels; the coarse ones come from ncd's table)."""
    base = root / "cifar-100-python"
    md5 = {}
    for split, n in (("train", n_train), ("test", n_test)):
        md5[split] = _pickle(base / split, {
            "filenames": [f"{i}.png" for i in range(n)], "batch_label": split, "fine_labels": _labels(n, 100),
            "coarse_labels": [0] * n, "data": _cifar_rows(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))})
    md5["meta"] = _pickle(base / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                                          "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    tvd.CIFAR100.train_list = [["train", md5["train"]]]
    tvd.CIFAR100.test_list = [["test", md5["test"]]]
    tvd.CIFAR100.meta = {"filename": "meta", "key": "fine_label_names", "md5": md5["meta"]}


def write_stl10(root: Path, n_train: int, n_test: int, rng: np.random.Generator) -> None:
    """STL-10's binaries (train, test, unlabeled; 1-based label files), class names and folds."""
    base = root / "stl10_binary"
    base.mkdir(parents=True, exist_ok=True)
    md5 = {}
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_train)):
        path = base / f"{split}_X.bin"
        rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8).tofile(path)  # channel planes, column-major
        md5[path.name] = calculate_md5(str(path))
        if split != "unlabeled":
            (base / f"{split}_y.bin").write_bytes((np.asarray(_labels(n, 10), np.uint8) + 1).tobytes())
            md5[f"{split}_y.bin"] = calculate_md5(str(base / f"{split}_y.bin"))
    (base / "class_names.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
    (base / "fold_indices.txt").write_text("\n".join(" ".join(map(str, range(min(n_train, 4)))) for _ in range(10)) + "\n")
    tvd.STL10.train_list = [[f, md5[f]] for f in ("train_X.bin", "train_y.bin", "unlabeled_X.bin")]
    tvd.STL10.test_list = [[f, md5[f]] for f in ("test_X.bin", "test_y.bin")]


def jpeg_pool(rng: np.random.Generator, tiny: bool) -> list[bytes]:
    """A few JPEG files to write round-robin: tiny ones with --tiny, else photo-sized (400 x 300, ~100 kB, a
    smooth colour field plus noise) so that decoding costs what an ImageNet image costs."""
    w, h = (64, 48) if tiny else (400, 300)
    out = []
    for _ in range(4 if tiny else 32):
        field_ = Image.fromarray(rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)).resize((w, h))
        arr = np.clip(np.asarray(field_, np.int16) + rng.integers(-32, 33, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_imagenet(root: Path, train: dict[str, int], val: dict[str, int], jpegs: list[bytes]) -> None:
    """An extracted ImageNet as torchvision reads it: meta.bin, train/<wnid>/*.JPEG, val/<wnid>/*.JPEG."""
    root.mkdir(parents=True, exist_ok=True)
    wnids = sorted(set(train) | set(val))
    torch.save(({w: (f"class {w}",) for w in wnids}, [w for w in sorted(val) for _ in range(val[w])]), root / "meta.bin")
    i = 0
    for split, counts in (("train", train), ("val", val)):
        for w, n in counts.items():
            folder = root / split / w
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(n):
                (folder / f"{w}_{j}.JPEG").write_bytes(jpegs[i % len(jpegs)])
                i += 1


def _spread(wnids: list[str], n: int) -> dict[str, int]:
    per, extra = divmod(n, len(wnids))
    return {w: per + (i < extra) for i, w in enumerate(wnids)}


def uno_imagenet_wnid_list() -> list[str]:
    """1000 sorted wnids that hold UNO's 118 excluded classes (every split's novel 30) and SCAN's subsets."""
    excluded, _ = uno_imagenet_wnids("A")
    real = sorted(set(excluded) | {w for w, _ in imagenet_subset_classes(200)})
    return sorted(real + [f"n9{i:07d}" for i in range(1000 - len(real))])


class Data:
    """Fabricates each dataset folder once, when an experiment first needs it, sized for every selected
    experiment that reads it (torchvision's md5 lists are global, so each dataset has one folder)."""

    def __init__(self, folder: Path, plan: Plan, need: dict[str, int]) -> None:
        self.folder, self.plan, self.need = folder, plan, need
        self.rng = np.random.default_rng(0)
        self.made: dict[str, Path | Exception] = {}
        self._jpegs: list[bytes] | None = None

    def jpegs(self) -> list[bytes]:
        if self._jpegs is None:
            self._jpegs = jpeg_pool(self.rng, self.plan.tiny)
        return self._jpegs

    def root(self, exp: dict[str, Any]) -> Path:
        key = data_key(exp)
        if key not in self.made:
            try:
                self.made[key] = self._make(key)
            except Exception as e:  # every experiment of this dataset fails with it
                self.made[key] = e
        made = self.made[key]
        if isinstance(made, Exception):
            raise made
        return made

    def _make(self, key: str) -> Path:
        root = self.folder / key
        if root.exists():
            shutil.rmtree(root)
        n, n_test = self.need[key], self.plan.n_test()
        if key == "cifar10":
            write_cifar10(root, max(n, 10), n_test, self.rng)
        elif key == "cifar100":
            write_cifar100(root, max(n, 100), n_test, self.rng)
        elif key == "stl10":
            write_stl10(root, max(n, 10), n_test, self.rng)
        elif key == "imagenet-uno":
            # UNO's split needs all 1000 class folders, each with an image (torchvision refuses empty ones);
            # val holds n_test images of the first classes, for the CLD probe's per-epoch validation
            wnids = uno_imagenet_wnid_list()
            n_val = max(1, min(n_test, len(wnids)))
            write_imagenet(root, _spread(wnids, max(n, 1000)), _spread(wnids[:n_val], n_test), self.jpegs())
        elif key in ("imagenet", "imagenet-subsets"):
            wnids = [w for w, _ in imagenet_subset_classes(50)][:IMAGENET_CLASSES]
            n_val = max(1, min(n_test, len(wnids)))  # no empty val folder: torchvision refuses one
            write_imagenet(root, _spread(wnids, n), _spread(wnids[:n_val], n_test), self.jpegs())
        else:
            raise CheckError(f"gpu_check cannot fabricate dataset folder {key!r}")
        return root


def write_moco_checkpoint(path: Path, backbone: str) -> Path:
    """A MoCo(-v2) checkpoint as published: ``state_dict`` with the query encoder under ``module.encoder_q.``
    (its MLP head under ``fc.``), the key encoder and the queue beside it."""
    if path.is_file():
        return path
    net, dim = build_backbone(backbone, 3)
    state = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}
    state.update({"module.encoder_q.fc.0.weight": torch.zeros(dim, dim), "module.encoder_q.fc.0.bias": torch.zeros(dim),
                  "module.encoder_q.fc.2.weight": torch.zeros(128, dim), "module.encoder_q.fc.2.bias": torch.zeros(128),
                  "module.encoder_k.conv1.weight": state["module.encoder_q.conv1.weight"].clone(),
                  "module.queue": torch.zeros(128, 16), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 800, "arch": backbone, "state_dict": state}, path)
    return path


def topk_knn_indices(device: torch.device):
    """A stand-in for neighbors.knn_indices where faiss is missing: exact inner-product top-(k+1) with torch."""

    def knn_indices(features: np.ndarray, k: int) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(device)
        kk = min(k + 1, len(x))
        rows = [(x[i:i + 4096] @ x.T).topk(kk, dim=1).indices.cpu() for i in range(0, len(x), 4096)]
        return torch.cat(rows).numpy().astype(np.int64)

    return knn_indices


# ----------------------------------------------------------------------------- instrumentation
@dataclass
class Probe:
    """What the check's callbacks record for one stage (both runs)."""

    stop_after: int                      # k (0: never stop)
    batches: int                         # batches per epoch
    run: int = 0                         # 0: the first run, 1: the resumed one
    steps: list[tuple[int, float, float, int]] = field(default_factory=list)   # (run, wait s, step s, batch)
    started_in_run: int = 0
    resumed_at: int | None = None


_PROBE: list[Probe] = [Probe(0, 1)]


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 0
    if isinstance(batch, (list, tuple)):
        for b in batch:
            n = _batch_size(b)
            if n:
                return n
    if isinstance(batch, dict):
        return _batch_size(list(batch.values()))
    return 0


def _sync(pl_module: L.LightningModule) -> None:
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)


class StepTimer(L.Callback):
    """Per training batch: the wait for it (previous batch end → this batch start) and the step (start → end,
    synchronised on CUDA). Also caps the epoch at the check's number of batches and mutes the progress bar."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.t_end = self.t_start = self.wait = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        trainer.limit_train_batches = self.probe.batches
        if trainer.progress_bar_callback is not None:
            trainer.progress_bar_callback.disable()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.probe.run == 1 and self.probe.resumed_at is None:
            self.probe.resumed_at = int(trainer.global_step)
        _sync(pl_module)
        self.t_end = time.perf_counter()  # a run resumed mid-epoch gets no on_train_epoch_start

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module)
        self.t_end = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        _sync(pl_module)
        self.t_start = time.perf_counter()
        self.wait = self.t_start - self.t_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        _sync(pl_module)
        self.t_end = time.perf_counter()
        self.probe.steps.append((self.probe.run, self.wait, self.t_end - self.t_start, _batch_size(batch)))


class StopAfter(L.Callback):
    """SIGUSR1 (SLURM's time-limit signal) as the k-th step of the first run starts: SaveOnSignal lets that
    step finish, writes last.ckpt and raises Preempted, so the first run trains exactly k steps."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        p = self.probe
        if p.run != 0 or not p.stop_after:
            return
        p.started_in_run += 1
        if p.started_in_run == p.stop_after:
            if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
                # the default action would kill this process
                raise CheckError("no SIGUSR1 handler is installed during training (SaveOnSignal is missing)")
            signal.raise_signal(signal.SIGUSR1)


class StageLog(logging.Handler):
    """The ncd, Lightning and warnings loggers → the current stage's log file (and its messages in memory)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        self.file: io.TextIOBase | None = None
        self.messages: list[str] = []

    def start(self, path: Path) -> None:
        self.stop()
        self.file = open(path, "a")
        self.messages = []

    def stop(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(record.getMessage())
            if self.file is not None:
                self.file.write(self.format(record) + "\n")
                self.file.flush()
        except Exception:
            self.handleError(record)

    def saw(self, prefix: str) -> bool:
        return any(m.startswith(prefix) for m in self.messages)

    def write(self, text: str) -> None:
        if self.file is not None:
            self.file.write(text)
            self.file.flush()

    def install(self) -> None:
        logging.captureWarnings(True)
        for name in ("ncd", "lightning", "lightning.pytorch", "lightning.fabric", "py.warnings"):
            lg = logging.getLogger(name)
            lg.handlers = [self]
            lg.setLevel(logging.INFO)
            lg.propagate = False


# ----------------------------------------------------------------------------------- running
@dataclass
class Result:
    experiment: str
    stage: str
    status: str          # ok, FAILED, SKIPPED
    detail: str

    def line(self) -> str:
        return f"{self.status:<7} {self.experiment:<28} {self.stage:<20} {self.detail}"


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _last_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}".strip()


def summarize(probe: Probe, plan: Plan) -> dict[str, Any]:
    """Steady-state figures over the recorded steps (each run's first plan.warmup(run) steps left out)."""
    measured = []
    for run in (0, 1):
        steps = [s for s in probe.steps if s[0] == run]
        measured += steps[plan.warmup(run):]
    steady = bool(measured)
    measured = measured or probe.steps
    wait = sum(s[1] for s in measured) / len(measured)
    step = sum(s[2] for s in measured) / len(measured)
    images = sum(s[3] for s in measured)
    return {"ips": images / max(1e-12, sum(s[2] for s in measured)), "wait": wait, "step": step, "steady": steady,
            "measured": len(measured), "bottleneck": bottleneck(wait, step, plan.device)}


class Checker:
    def __init__(self, config: dict[str, Any], plan: Plan, out: Path, names: list[str], keep: bool = False) -> None:
        self.config, self.plan, self.out, self.names, self.keep = config, plan, out, names, keep
        self.results: list[Result] = []
        self.log = StageLog()
        self.prepared: dict[str, tuple[dict, list[Stage], Notes] | BaseException] = {}
        need: dict[str, int] = {}
        for name in names:
            try:
                exp, stages, notes = prepare(config, name, plan)
            except Exception as e:
                self.prepared[name] = e
                continue
            self.prepared[name] = (exp, stages, notes)
            key = data_key(exp)
            need[key] = max(need.get(key, 0), train_images_needed(exp, stages, plan))
        self.data = Data(out / "data", plan, need)
        try:
            import faiss  # noqa: F401
            self.faiss = True
        except ImportError:
            self.faiss = False

    # -- output
    def emit(self, r: Result) -> None:
        self.results.append(r)
        print(r.line(), flush=True)

    @staticmethod
    def progress(text: str) -> None:
        print(f"-> {text}", file=sys.stderr, flush=True)

    # -- experiments
    def run(self) -> None:
        factories = [lambda: StepTimer(_PROBE[0]), lambda: StopAfter(_PROBE[0])]
        training.EXTRA_CALLBACKS.extend(factories)
        self.log.install()
        try:
            for name in self.names:
                self.experiment(name)
            self.label_step()
        finally:
            for f in factories:
                training.EXTRA_CALLBACKS.remove(f)
            self.log.stop()

    def experiment(self, name: str) -> None:
        prepared = self.prepared[name]
        if isinstance(prepared, BaseException):
            self.emit(Result(name, "-", "FAILED", f"config: {_last_line(prepared)}"))
            return
        exp, stages, notes = prepared
        run_dir = self.out / "runs" / name / "seed0"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        try:
            root = self.data.root(exp)
            self._fit_to_data(exp, stages)
            if exp.get("pretrain", {}).get("pretext") == "moco":
                exp["pretrain"]["checkpoint"] = str(write_moco_checkpoint(
                    self.out / "weights" / f"moco_{exp['backbone']}_fabricated.pth.tar", exp["backbone"]))
                notes.setdefault("pretrain", []).append("MoCo checkpoint fabricated")
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            for st in stages:
                self.emit(Result(name, st.name, "FAILED", f"data: {_last_line(e)}"))
            return
        for st in stages:
            missing = [up for up in st.inputs_for(exp).values() if not (run_dir / up / STAGES[up].output).is_file()]
            if missing:
                self.emit(Result(name, st.name, "SKIPPED", f"input missing: the {missing[0]} stage's "
                                                           f"{STAGES[missing[0]].output} (that stage failed)"))
                continue
            self.progress(f"{name}/{st.name}")
            t0 = time.perf_counter()
            try:
                r = self.stage(name, exp, st, root, run_dir, notes)
            except Exception as e:
                tb = traceback.format_exc()
                print(f"--- {name}/{st.name}\n{tb}", file=sys.stderr, flush=True)
                self.log.write(tb)
                r = Result(name, st.name, "FAILED", f"{_last_line(e)} ({time.perf_counter() - t0:.1f} s)")
            finally:
                self.log.stop()
                gc.collect()
                if self.plan.cuda:
                    torch.cuda.empty_cache()
            self.emit(r)
        if not self.keep:  # checkpoints add up (SeLa's ImageNet stage writes 2 GB)
            shutil.rmtree(run_dir, ignore_errors=True)

    def _fit_to_data(self, exp: dict[str, Any], stages: list[Stage]) -> None:
        """k-means stages ask for at most as many clusters as there are images (only --tiny ImageNet subsets
        have fewer images than classes)."""
        n = self.data.need[data_key(exp)]
        k = get_info(exp["dataset"]).num_classes
        for b in ("cluster", "pretext_kmeans"):
            if b in _blocks(stages) and not exp[b].get("num_clusters") and n < k:
                exp[b]["num_clusters"] = min(n, IMAGENET_CLASSES)

    def stage(self, name: str, exp: dict[str, Any], st: Stage, root: Path, run_dir: Path, notes: Notes) -> Result:
        plan = self.plan
        out_dir = run_dir / st.name
        out_dir.mkdir(parents=True, exist_ok=True)
        self.log.start(out_dir / "gpu_check.log")
        cfg = check_stage_config(name, st.name, stage_slice(exp, st.name))
        ctx = common.RunContext(name, 0, st.name, cfg, root, out_dir)
        ups = st.inputs_for(exp)
        inputs = [run_dir / up / STAGES[up].output if arg in ups else None for arg, up in st.inputs.items()]
        out = out_dir / st.output
        fn = load(st.run)
        probe = Probe(plan.steps if st.resumable else 0, plan.batches(stage_batch_size(exp, st)))
        _PROBE[0] = probe
        extra = list(dict.fromkeys(n for b in ("", *st.blocks) for n in notes.get(b, [])))
        restore = None
        if st.name == "mine" and not self.faiss:
            import ncd.methods.neighbors as nb
            restore = nb.knn_indices
            nb.knn_indices = topk_knn_indices(torch.device(plan.device))
            extra.append("neighbours by gpu_check's torch top-k: faiss is not installed")
        if plan.cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            seed_everything(0)
            try:
                fn(ctx, *inputs, out)
                preempted = False
            except Preempted:
                preempted = True
            if preempted:
                if not (out_dir / "last.ckpt").is_file():
                    raise CheckError("Preempted was raised but last.ckpt was not written")
                probe.run = 1
                seed_everything(0)
                fn(ctx, *inputs, out)
                if not self.log.saw("resuming stage"):
                    raise CheckError("the rerun did not resume from last.ckpt (no 'resuming stage' log line)")
                if not probe.resumed_at:
                    raise CheckError(f"the rerun resumed at global step {probe.resumed_at}, expected > 0")
            elif probe.steps:
                raise CheckError(f"the first run ended after {len(probe.steps)} steps, before the stop after "
                                 f"{plan.steps}: its epoch is too short for the check")
        finally:
            if restore is not None:
                nb.knn_indices = restore
        wall = time.perf_counter() - t0
        if not out.is_file():
            raise CheckError(f"{out.name} was not written")
        peak = _gib(torch.cuda.max_memory_allocated()) if plan.cuda else "n/a"
        if not probe.steps:
            why = "MoCo import" if st.name == "pretrain" and exp["pretrain"].get("pretext") == "moco" else \
                "not a Lightning training stage" if not st.resumable else "Lightning's fit was not called"
            return Result(name, st.name, "ok", f"no training step ({'; '.join([why, *extra])}; peak {peak}; {wall:.1f} s)")
        s = summarize(probe, plan)
        info = [f"{len(probe.steps)} steps timed, stopped after {plan.steps}, resumed at step {probe.resumed_at}",
                *([] if s["steady"] or plan.tiny else ["no steady state: all steps timed"]), *extra, f"{wall:.1f} s"]
        return Result(name, st.name, "ok",
                      f"{s['ips']:9.1f} img/s  peak {peak:>9}  wait {1e3 * s['wait']:8.1f} ms  "
                      f"step {1e3 * s['step']:8.1f} ms  bottleneck {s['bottleneck']:<11}  ({'; '.join(info)})")

    # -- SeLa's label step
    def label_step(self) -> None:
        from ncd.losses.sela import label_step_plan, sela_label_step

        plan = self.plan
        name = next((n for n in ("sela_imagenet_alexnet", "sela_imagenet_resnet50") if n in self.config["experiments"]),
                    None)
        n, k = (2_000, 30) if plan.tiny else (200_000, 3_000)
        self.progress(f"SeLa label step, N={n}, K={k}")
        try:
            if name is None:
                raise CheckError("paper.yaml has no SeLa ImageNet experiment")
            exp = resolve_experiment(self.config, name)
            sc, ls = exp["sela"], exp["sela"]["label_step"]
            _, d = build_backbone(exp["backbone"], 3, **exp.get("backbone_kwargs", {}))
            chunk = int(ls["chunk_size"]) or None
            storage = label_step_plan(n, k, float(ls["memory_mb"]), ls["storage"], d, chunk)["storage"]
            device = torch.device(plan.device if ls["device"] == "auto" else ls["device"])
            g = torch.Generator(device=device).manual_seed(0)
            # as SeLaModule.label_step: float32 features on the CPU, a head's weights (SeLa's N(0, 0.01) init) on
            # the training device
            feats = torch.randn(n, d, generator=g, device=device).cpu()
            weight = 0.01 * torch.randn(k, d, generator=g, device=device)
            bias = torch.zeros(k, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            labels, _, _, info = sela_label_step(feats, weight, bias, float(sc["lamb"]), float(sc["tol"]),
                                                 int(sc["check_every"]), storage=storage, chunk_size=chunk,
                                                 device=device, return_info=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            secs = time.perf_counter() - t0
            peak = _gib(torch.cuda.max_memory_allocated()) if device.type == "cuda" else "n/a"
            used = int(torch.unique(labels).numel())
            self.emit(Result("sela_label_step", name, "ok",
                             f"N={n} K={k} d={d} storage {storage} on {device.type}: {secs:.2f} s, "
                             f"{info['iterations']} Sinkhorn iterations, {used} clusters used, peak {peak}"))
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            self.emit(Result("sela_label_step", name or "-", "FAILED", _last_line(e)))
        finally:
            gc.collect()
            if plan.cuda:
                torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py",
                                description="Run every paper experiment's training path (step, stop, resume) "
                                            "on one device and time it.")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="default: cuda")
    p.add_argument("--tiny", action="store_true", help="batch size 4 and tiny datasets: a quick run")
    p.add_argument("--experiments", nargs="+", metavar="NAME", help="a subset of paper.yaml's experiments")
    p.add_argument("--out", type=Path, help="folder for the fabricated data and the runs (kept); "
                                            "default: a temporary folder, removed at the end")
    p.add_argument("--steps", type=int, help="k: stop the first run after k steps (default 3, --tiny 2)")
    p.add_argument("--augment", choices=["pil", "batched"], default="pil",
                   help="augment.backend of every experiment (default pil, paper.yaml's); batched makes the views "
                        "of the stages that have a batched path on the device")
    p.add_argument("--channels-last", action="store_true",
                   help="runtime.channels_last of every experiment: weights and activations in channels-last layout "
                        "(with --augment batched and a bf16 experiment: the fast path on a GPU)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()  # as every `python -m ncd` stage does (ncd.utils.keep_freed_memory)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False); "
                     "use --device cpu")
    steps = args.steps if args.steps is not None else (2 if args.tiny else 3)
    if steps < 1:
        parser.error(f"--steps must be at least 1, got {steps}")
    if not hasattr(training, "EXTRA_CALLBACKS"):
        parser.error("ncd.methods.training has no EXTRA_CALLBACKS: this check needs that hook of fit()")
    config = load_paper_config()
    names = paper_experiments(config)
    if args.experiments:
        unknown = [n for n in args.experiments if n not in names]
        if unknown:
            parser.error(f"unknown experiment(s): {', '.join(unknown)}; expected names from {PAPER.relative_to(ROOT)}: "
                         + ", ".join(names))
        names = [n for n in names if n in args.experiments]
    plan = Plan(args.device, args.tiny, steps, args.augment, args.channels_last)
    shrunk = shrink_imagenet_for_tiny() if plan.tiny else []
    keep = args.out is not None
    out = args.out.resolve() if keep else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    dev = torch.cuda.get_device_name() if plan.cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"gpu_check: {args.device} ({dev}), torch {torch.__version__}, lightning {L.__version__}; "
          f"{'batch size ' + str(TINY_BATCH) if plan.tiny else 'paper batch sizes'}; SIGUSR1 after {steps} steps, "
          f"epochs of {plan.batches(TINY_BATCH)}{'' if plan.tiny else f'/{plan.batches(512)}'} batches; "
          f"{len(names)} experiments; {'folder' if keep else 'temporary folder'} {out}", flush=True)
    if shrunk:
        print(f"gpu_check: --tiny: {', '.join(shrunk)} at Resize {TINY_IMAGENET_SIDES[0]} / crop {TINY_IMAGENET_SIDES[1]} "
              "instead of 256 / 224; SeLa's ResNet crops alike (AlexNet and InfoMin's jigsaw keep their sizes)", flush=True)
    try:
        checker = Checker(config, plan, out, names, keep)
        if not checker.faiss:
            print("gpu_check: faiss is not installed: mining uses a torch top-k stand-in", flush=True)
        if JSONSCHEMA_STAND_IN:
            print("gpu_check: jsonschema is not installed: the config's defaults are filled by gpu_check's "
                  "stand-in, without validation", flush=True)
        checker.run()
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    failed = [f"{r.experiment}/{r.stage}" + (" (skipped)" if r.status == "SKIPPED" else "")
              for r in checker.results if r.status != "ok"]
    n_ok = sum(r.status == "ok" for r in checker.results)
    print(f"gpu_check: wall time {time.perf_counter() - started:.0f} s", flush=True)
    print(f"gpu_check: {n_ok} ok, {len(failed)} failed" + (": " + ", ".join(failed) if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
