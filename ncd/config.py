"""Load, validate and resolve the workflow configuration, and cut it into per-stage slices.

The schema is package data (``ncd/schema/config.schema.yaml`` plus one file per config block in
``ncd/schema/blocks/``), so the installed package validates a config without the repository. Used
by the Snakefile (validation with defaults filled in, the slice each job receives and hashes) and
by the command line (each stage checks the slice it receives), so both give the same clear errors.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ncd.errors import NcdError
from ncd.stages import EVALUATE_BLOCKS, METHODS, RUNTIME_REQUESTS, SHARED_KEYS, STAGES, stages_of
from ncd.utils import config_hash

SCHEMA_DIR = Path(__file__).resolve().parent / "schema"
SCHEMA_PATH = SCHEMA_DIR / "config.schema.yaml"
# torch-free tables for the checks the schema cannot express (validation runs on every Snakemake call)
BACKBONES_PATH = SCHEMA_DIR / "backbones.yaml"
DATASETS_PATH = SCHEMA_DIR / "datasets.yaml"


# libyaml's loader where PyYAML was built with it: parsing the schema files with the pure-Python one
# took about 0.08 s of every job's start-up, libyaml 0.01 s (same SafeConstructor, so the same values)
_SCHEMA_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_schema_yaml(path: Path) -> Any:
    """One of the project's own schema or table YAML files (never user input), read with the fastest safe loader."""
    return yaml.load(path.read_text(), Loader=_SCHEMA_LOADER)


def schema() -> dict[str, Any]:
    """The whole config schema: the top level, every config block, and the methods of the stage table."""
    # parsed once: the workflow resolves experiments for every job of the DAG; callers only read it
    global _SCHEMA_CACHE
    if _SCHEMA_CACHE is None:
        full = _read_schema_yaml(SCHEMA_PATH)
        props = full["definitions"]["experiment"]["properties"]
        for f in sorted((SCHEMA_DIR / "blocks").glob("*.yaml")):
            props[f.stem] = _read_schema_yaml(f)
        props["method"]["enum"] = list(METHODS)
        _SCHEMA_CACHE = full
    return _SCHEMA_CACHE


_schema = schema
_SCHEMA_CACHE: dict[str, Any] | None = None


def _validator(schema: dict[str, Any]):
    """A Draft-7 validator that fills in ``default`` values as it descends."""
    base = jsonschema.Draft7Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    cls = jsonschema.validators.extend(base, {"properties": set_defaults})
    return cls(schema)


def _where(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _explain(error) -> str:
    """Turn a jsonschema error into a message that names the bad value and what was expected."""
    where = _where(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        keys = ", ".join(f"'{k}'" for k in extra)
        return f"unknown config key {keys} in {where}; expected one of: {', '.join(allowed)}"
    if error.validator == "enum":
        return f"config value {error.instance!r} at {where} is not valid; expected one of: " + \
            ", ".join(map(str, error.validator_value))
    if error.validator == "required":
        return f"config block {where} is missing a key: {error.message}"
    return f"config value at {where} is not valid: {error.message}"


def validate(config: dict[str, Any], schema: dict[str, Any] | None = None, *,
             data_checks: bool = True) -> dict[str, Any]:
    """Validate ``config`` in place against the schema, filling defaults; return it.

    Strings where the schema expects another type are read as YAML first (:func:`coerce_strings`:
    Snakemake hands nested ``--config`` values over as strings). ``data_checks``: also check the
    counts against the data and the keys that depend on each other across config blocks
    (:func:`check_counts`); off for a stage's slice, which lacks the other stages' blocks."""
    schema = schema or _schema()
    coerce_strings(config, schema)
    v = _validator(schema)
    errors = list(v.iter_errors(config))
    if errors:
        raise NcdError(_explain(jsonschema.exceptions.best_match(errors)))
    check_semantics(config, data_checks=data_checks)
    return config


# --- strings from `snakemake --config` --------------------------------------------------------

_TYPE_CHECKS = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool)
    or isinstance(v, float) and v.is_integer(),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def _resolve_ref(ref: str, root: dict[str, Any]) -> dict[str, Any]:
    node: Any = root
    for part in ref.lstrip("#/").split("/"):
        node = node[part]
    return node


def _parts(schema: dict[str, Any], root: dict[str, Any]) -> list[dict[str, Any]]:
    """``schema`` and the schemas it includes through ``$ref`` and ``allOf`` (what the schemas here use)."""
    out, todo = [], [schema]
    while todo:
        s = todo.pop(0)
        if not isinstance(s, dict):
            continue
        out.append(s)
        if "$ref" in s:
            todo.append(_resolve_ref(s["$ref"], root))
        todo.extend(s.get("allOf", []))
    return out


def _admits(parts: list[dict[str, Any]], value: Any) -> bool:
    """Whether ``value`` passes the ``type`` and ``enum`` of every part (the rest is the validator's job)."""
    for p in parts:
        types = p.get("type")
        if types is not None:
            types = [types] if isinstance(types, str) else types
            if not any(_TYPE_CHECKS[t](value) for t in types if t in _TYPE_CHECKS):
                return False
        if "enum" in p and not any(value == e and type(value) is type(e) for e in p["enum"]):
            return False
    return True


def _read_string(text: str, parts: list[dict[str, Any]]) -> Any:
    """``text`` read as YAML (or as a number: YAML 1.1 reads 1e-3 as a string) when the result fits
    ``parts``; else ``text`` itself, so that the error names what was given."""
    candidates = []
    try:
        candidates.append(yaml.safe_load(text))
    except yaml.YAMLError:
        pass
    for conv in (int, float):
        try:
            candidates.append(conv(text))
        except ValueError:
            pass
    return next((c for c in candidates if not isinstance(c, str) and _admits(parts, c)), text)


def _coerce(value: Any, schema: dict[str, Any], root: dict[str, Any]) -> Any:
    parts = _parts(schema, root)
    if isinstance(value, str) and not _admits(parts, value):
        value = _read_string(value, parts)
    if isinstance(value, dict):
        props: dict[str, Any] = {}
        extra = None
        for p in parts:
            for k, sub in p.get("properties", {}).items():
                props.setdefault(k, sub)
            if extra is None and isinstance(p.get("additionalProperties"), dict):
                extra = p["additionalProperties"]
        for k in list(value):
            sub = props.get(k, extra)
            if sub is not None:
                value[k] = _coerce(value[k], sub, root)
    elif isinstance(value, list):
        items = next((p["items"] for p in parts if isinstance(p.get("items"), dict)), None)
        if items is not None:
            value[:] = [_coerce(v, items, root) for v in value]
    return value


def coerce_strings(config: dict[str, Any], schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read, in place, each string of ``config`` where the schema expects another type (integer,
    number, boolean, null, array, object, or an enum without it) as YAML, recursively; return ``config``.

    Snakemake parses a nested ``--config`` value with YAML's base loader, which keeps every scalar a
    string: ``--config 'seeds=[0]'`` arrives as ``['0']``, ``'runtime={threads: 2}'`` as
    ``{'threads': '2'}``. A string the schema accepts as it is stays a string; one that reads as
    nothing the schema accepts stays too, so that validation names it."""
    schema = schema or _schema()
    return _coerce(config, schema, schema)


def check_split_name(name: str, exp: dict[str, Any]) -> None:
    """A named split must exist and belong to the experiment's dataset."""
    split_name = exp.get("split_name")
    if not split_name:
        return
    # lazily: ncd.data imports torch, and the Snakefile imports this module for every parse
    from ncd.data.uno import UNO_SPLITS

    if split_name not in UNO_SPLITS:
        raise NcdError(f"unknown split_name {split_name!r} in experiment '{name}'; expected one of: "
                       + ", ".join(UNO_SPLITS))
    want = UNO_SPLITS[split_name]["dataset"]
    if want != exp["dataset"]:
        raise NcdError(f"split_name {split_name!r} of experiment '{name}' is a split of dataset '{want}', "
                       f"but the experiment's dataset is '{exp['dataset']}'")


def check_class_split(name: str, exp: dict[str, Any]) -> None:
    """A known/novel split must be disjoint and cover exactly the dataset's classes."""
    split = exp.get("split")
    if not split:
        return
    if exp["dataset"] == "imagefolder":
        folder = exp.get("data_path")
        if not folder or not Path(folder).is_dir():
            return  # a user's folder: its classes can only be counted once it is there
        # lazily: ncd.data imports torch, and the Snakefile imports this module for every parse
        from ncd.data import get_info

        n = get_info("imagefolder", folder).num_classes
    else:
        n = dataset_sizes()[exp["dataset"]]["classes"]
    known, novel = list(split.get("known", [])), list(split.get("novel", []))
    everything = set(range(n))
    bad = sorted(c for c in known + novel if c not in everything)
    overlap = sorted(set(known) & set(novel))
    missing = sorted(everything - set(known) - set(novel))
    if bad or overlap or missing or len(known) + len(novel) != n:
        raise NcdError(
            f"class split of experiment '{name}' does not add up: {len(known)} known + {len(novel)} novel "
            f"classes for dataset '{exp['dataset']}' with {n} classes (ids 0..{n - 1}); "
            f"out of range: {bad}, in both: {overlap}, in neither: {missing}"
        )


def check_semantics(config: dict[str, Any], *, data_checks: bool = True) -> None:
    """Checks the schema cannot express (``data_checks``: with :func:`check_counts`)."""
    names = config.get("run_experiments")
    if names is not None:
        unknown = [n for n in names if n not in config["experiments"]]
        if unknown:
            raise NcdError(f"run_experiments names unknown experiment(s) {unknown}; expected names from: "
                           + ", ".join(sorted(config["experiments"])))
    for name, exp in config["experiments"].items():
        check_class_split(name, exp)
        check_split_name(name, exp)
        if exp["method"] == "uno" and not (exp.get("split") or exp.get("split_name")):
            raise NcdError(f"experiment '{name}' uses method 'uno' but has no class split; expected "
                           "'split' (known/novel class ids) or 'split_name'")
        check_backbone(name, exp)
        check_augment_backend(name, exp)
        if data_checks:
            check_counts(name, exp, config)


def check_augment_backend(name: str, exp: dict[str, Any]) -> None:
    """``augment.backend: batched`` with an augmentation that has no batched path, caught before any job
    runs (the view builders of ncd.data.batched*, ncd.data.cld and ncd.methods.sela_eval refuse the same)."""
    aug = exp.get("augment") or {}
    own = [st.name for st in stages_of(exp["method"])]
    for st in aug.get("stages") or {}:
        if st not in own:
            raise NcdError(f"experiment '{name}': augment.stages names stage {st!r}, which method "
                           f"'{exp['method']}' does not have; expected one of: {', '.join(own)}")
    if "batched" not in stage_backends(exp).values():
        return

    def refuse(what: str, expected: str) -> None:
        raise NcdError(f"experiment '{name}': augment.backend 'batched' has no batched path for {what}; "
                       f"expected {expected}, or augment.backend: pil")

    method = exp["method"]
    if (exp.get("transform") or {}).get("resize"):
        refuse(f"transform.resize {exp['transform']['resize']} (no resize first)", "transform.resize: 0")
    if method == "cld":
        c = exp.get("cld") or {}
        aug, inst = c.get("augmentation", "npid"), c.get("instance", "npid")
        if inst == "infomin":
            refuse("cld.instance 'infomin' (its jigsaw patches)", "instance npid, moco or mocov2")
        if aug not in ("npid", "mocov2"):
            refuse(f"cld.augmentation {aug!r}", "'npid' or 'mocov2'")
        o = c.get("augment") or {}
        if aug == "mocov2" and (o.get("blur_p") is None or o.get("blur_p") > 0 or o.get("erasing")):
            refuse(f"cld.augmentation 'mocov2' with blur_p {o.get('blur_p')} / erasing {bool(o.get('erasing'))} "
                   "(Gaussian blur, random erasing)", "cld.augment.blur_p: 0 and erasing: false")
    elif method == "sela":
        o = (exp.get("sela") or {}).get("augment") or {}
        resize = o.get("resize", 256 if o.get("preset", "imagenet") == "cifar" else 0)
        if resize:
            refuse(f"sela.augment.resize {resize} (no resize first; the cifar preset resizes to 256)",
                   "sela.augment.resize: 0")
    elif method == "uno" and (str(exp.get("dataset", "")).startswith("imagenet") or exp.get("dataset") == "stl10"):
        refuse(f"UNO's ImageNet augmentation of dataset {exp['dataset']!r} (Gaussian blur, grayscale)",
               "a CIFAR-style dataset")


# --- backbones ----------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def backbone_table() -> dict[str, Any]:
    """``ncd/schema/backbones.yaml``: each backbone name and the JSON schemas of its ``backbone_kwargs``."""
    return _read_schema_yaml(BACKBONES_PATH)


TIMM = "timm:<name>"


def _expected(sub: dict[str, Any]) -> str:
    """What a schema of one keyword accepts, in words."""
    if "enum" in sub:
        what = "one of: " + ", ".join(map(str, sub["enum"]))
    else:
        what = {"integer": "an integer", "number": "a number", "boolean": "true or false",
                "string": "a string"}.get(sub.get("type"), str(sub.get("type")))
        if "minimum" in sub:
            what += f" >= {sub['minimum']}"
        if "maximum" in sub:
            what += f" <= {sub['maximum']}"
    return what + (f": {sub['description']}" if sub.get("description") else "")


def check_backbone(name: str, exp: dict[str, Any]) -> None:
    """The backbone must exist, and each of its ``backbone_kwargs`` must be one it takes, of the right
    type and range (``ncd/schema/backbones.yaml``)."""
    table = backbone_table()
    backbone = str(exp.get("backbone"))
    key = TIMM if backbone.startswith("timm:") and len(backbone) > len("timm:") else backbone
    if key not in table:
        raise NcdError(f"unknown backbone {backbone!r} in experiment '{name}'; expected one of: "
                       + ", ".join(table))
    spec = table[key]["kwargs"] or {}
    kwargs = exp.get("backbone_kwargs") or {}
    coerce_strings(kwargs, {"type": "object", "properties": spec})
    for k, v in kwargs.items():
        if k not in spec:
            raise NcdError(f"unknown backbone_kwargs key '{k}' in experiment '{name}' for backbone '{backbone}'; "
                           "expected " + (f"one of: {', '.join(spec)}" if spec else "none (it takes no backbone_kwargs)"))
        if next(jsonschema.Draft7Validator(spec[k]).iter_errors(v), None) is not None:
            raise NcdError(f"backbone_kwargs.{k} {v!r} of experiment '{name}' is not valid for backbone "
                           f"'{backbone}'; expected {_expected(spec[k])}")


# --- counts against the data ----------------------------------------------------------------------

@lru_cache(maxsize=None)
def dataset_sizes() -> dict[str, Any]:
    """``ncd/schema/datasets.yaml``: classes, split roles and images per split (and class) of each dataset."""
    return _read_schema_yaml(DATASETS_PATH)


# torchvision's IMG_EXTENSIONS (the image folder loader's), here without importing torch
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _subdirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


class DataFacts:
    """What a config shows about the images of an experiment's dataset, without reading them: the
    table of the registered datasets, or for ``imagefolder`` a count of the files in the folder
    (the layout of :func:`ncd.data.datasets.imagefolder_samples`), when the folder is there."""

    def __init__(self, exp: dict[str, Any], data_dir: str = "data") -> None:
        self.dataset = exp["dataset"]
        self.info = dataset_sizes()[self.dataset]
        self.root: Path | None = None
        if self.dataset == "imagefolder":
            root = Path(exp.get("data_path") or os.path.join(data_dir, "imagefolder"))
            self.root = root if root.is_dir() else None

    def split(self, role: str) -> str:
        """The split with ``role`` (train, pretrain, test)."""
        return self.info[role]

    def has_split(self, split: str) -> bool:
        return split in self.info["splits"]

    def _folder(self, split: str) -> Path:
        assert self.root is not None
        if (self.root / "train").is_dir():
            return self.root / split if (self.root / split).is_dir() else self.root / "train"
        return self.root

    def class_names(self) -> list[str] | None:
        """Class names of a user's folder (sorted union over both splits); None: not there (yet)."""
        if self.root is None:
            return None
        return sorted(set().union(*(_subdirs(self._folder(s)) for s in ("train", "test"))))

    @property
    def num_classes(self) -> int | None:
        if self.dataset != "imagefolder":
            return int(self.info["classes"])
        names = self.class_names()
        return None if names is None else len(names)

    def _count_files(self, folder: Path, classes: list[str] | None, cap: int) -> int:
        n = 0
        subdirs = _subdirs(folder)
        if not subdirs:  # loose images: unlabelled
            if classes:
                return 0
            for e in os.scandir(folder):
                n += _is_image(e.name) and e.is_file()
                if n >= cap:
                    break
            return n
        for c in (subdirs if classes is None else [c for c in classes if c in subdirs]):
            for _, _, files in os.walk(folder / c, followlinks=True):
                n += sum(map(_is_image, files))
                if n >= cap:
                    return n
        return n

    def images(self, split: str, classes: list[int] | int | None = None, *, cap: int,
               which: str = "") -> tuple[int, str] | None:
        """``(n, description)``: at most ``n`` images in ``split`` (of ``classes``: ids, or a number of
        classes where only that is known; ``which`` names them, e.g. "known"); None where the config
        cannot tell. A user's folder is counted up to ``cap`` files only (``n >= cap``: at least)."""
        label = f"{self.dataset}/{split}"
        of = "" if classes is None else \
            f" of the {classes if isinstance(classes, int) else len(classes)} {which} classes".replace("  ", " ")
        if self.dataset == "imagefolder":
            if self.root is None:
                return None
            names = None
            if classes is not None:
                everything = self.class_names() or []
                if isinstance(classes, int) or any(not 0 <= c < len(everything) for c in classes):
                    return None
                names = [everything[c] for c in classes]
            folder = self._folder(split)
            n = self._count_files(folder, names, cap)
            return n, f"the {n} images{of} in {folder}"
        facts = self.info["splits"].get(split)
        if facts is None:
            return None
        if classes is None and "images" in facts:
            return int(facts["images"]), f"the {facts['images']} images of {label}"
        ids = range(int(self.info["classes"])) if classes is None else classes
        count = ids if isinstance(ids, int) else len(ids)
        per_class = facts.get("per_class")
        if isinstance(per_class, list):
            if isinstance(ids, int):
                return None
            n = sum(per_class[c] for c in ids if 0 <= c < len(per_class))
            return n, f"the {n} images{of} in {label}"
        if per_class is not None:
            n = count * int(per_class)
            return n, f"the {n} images{of} in {label}"
        if "per_class_range" in facts:
            most = int(facts["per_class_range"][1])
            return count * most, f"the at most {count * most} images ({count} classes x at most {most}){of} in {label}"
        return None


def _limit(name: str, key: str, value: int, data: DataFacts, split: str, what: str,
           classes: list[int] | int | None = None, which: str = "", spare: int = 0) -> None:
    """``value`` (of config key ``key``) must not exceed the images of ``split`` less ``spare``;
    ``what`` says why, with ``{data}`` where the images are named."""
    got = data.images(split, classes, cap=value + spare, which=which)
    if got is None:
        return
    n, desc = got
    if value > n - spare:
        raise NcdError(f"{key} {value} of experiment '{name}' {what.format(data=desc)}; "
                       f"expected at most {max(0, n - spare)}")


BATCH = "is larger than {data}, the stage's training data (it drops the last partial batch, so no batch would be left)"
NEIGHBOURS = "asks for more neighbours than each image has (itself not counted) among {data}"
CLUSTERS = "asks for more clusters than {data}"


def _uno_classes(exp: dict[str, Any]) -> tuple[list[int] | int, list[int] | int] | None:
    """Known and novel classes of a UNO experiment: ids, or counts where only those are known (ImageNet)."""
    if exp.get("split"):
        return list(exp["split"].get("known", [])), list(exp["split"].get("novel", []))
    name = exp.get("split_name")
    if not name:
        return None
    # lazily, as check_split_name: ncd.data imports torch
    from ncd.data.uno import UNO_SPLITS, uno_imagenet_wnids

    spec = UNO_SPLITS[name]
    if "excluded" in spec:
        excluded, novel = uno_imagenet_wnids(name)
        return int(dataset_sizes()[spec["dataset"]]["classes"]) - len(excluded), len(novel)
    return list(spec["known"]), list(spec["novel"])


def _count(classes: list[int] | int) -> int:
    return classes if isinstance(classes, int) else len(classes)


def _runtime(exp: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    defaults = _schema()["properties"]["runtime"]["default"]
    return {**defaults, **(config.get("runtime") or {}), **(exp.get("runtime") or {})}


def _batch_norm(backbone: str) -> bool:
    """Whether the backbone has BatchNorm (every named one; a timm model may not)."""
    return not backbone.startswith("timm:")


def check_counts(name: str, exp: dict[str, Any], config: dict[str, Any]) -> None:
    """Counts the config alone shows to be larger than the data, in the stages the experiment runs:
    training batches of stages that drop the last partial batch, neighbours, clusters; and the keys
    of one stage that must fit those of another (SCAN's neighbours and the mined ones, CLD's probe
    batch and the devices). A user's image folder is checked once it is there."""
    data = DataFacts(exp, config.get("data_dir", "data"))
    train, classes = data.split("train"), data.num_classes
    stages = {s.name for s in stages_of(exp["method"], exp)}

    def clusters(key: str, k: int, split: str) -> None:
        if int(k) == 0 and classes == 0:
            raise NcdError(f"{key} 0 of experiment '{name}' means the number of classes, but the images in "
                           f"{data.root} have no class folders; expected the number of clusters")
        if int(k) or classes:
            _limit(name, key, int(k) or int(classes), data, split, CLUSTERS)

    def split_of(key: str, split: str | None, default_role: str) -> str:
        split = split or data.split(default_role)
        if not data.has_split(split):
            raise NcdError(f"{key} {split!r} of experiment '{name}' is not a split of dataset '{data.dataset}'; "
                           "expected one of: " + ", ".join(data.info["splits"]))
        return split

    if "cluster" in stages:
        clusters("cluster.num_clusters", exp["cluster"]["num_clusters"], train)
    if "pretrain" in stages:
        pre = exp["pretrain"]
        if pre["pretext"] == "moco" and not pre["checkpoint"]:
            raise NcdError(f"pretrain.pretext of experiment '{name}' is 'moco' but pretrain.checkpoint is empty; "
                           "expected the URL or path of a MoCo checkpoint")
        if pre["pretext"] == "simclr":
            _limit(name, "pretrain.batch_size", pre["batch_size"], data, data.split("pretrain"), BATCH)
    if "mine" in stages:
        _limit(name, "mine.topk", exp["mine"]["topk"], data, train, NEIGHBOURS, spare=1)
        _limit(name, "mine.topk_val", exp["mine"]["topk_val"], data, data.split("test"), NEIGHBOURS, spare=1)
    if "pretext_kmeans" in stages:
        clusters("pretext_kmeans.num_clusters", exp["pretext_kmeans"]["num_clusters"], train)
    if "scan" in stages:
        sc, mine = exp["scan"], exp["mine"]
        _limit(name, "scan.batch_size", sc["batch_size"], data, train, BATCH)
        k = int(sc["num_clusters"]) or classes
        if k is not None and k < 2:
            raise NcdError(f"scan.num_clusters {sc['num_clusters']} of experiment '{name}' gives {k} cluster(s) "
                           f"(dataset '{data.dataset}' has {classes} classes); expected at least 2")
        clusters("scan.num_clusters", sc["num_clusters"], train)
        for key, mined in (("num_neighbors", "topk"), ("num_neighbors_val", "topk_val")):
            if sc[key] > mine[mined]:
                raise NcdError(f"scan.{key} {sc[key]} of experiment '{name}' is more than the {mine[mined]} neighbours "
                               f"the mine stage keeps (mine.{mined}); expected at most {mine[mined]}, or a larger mine.{mined}")
    if "selflabel" in stages:
        _limit(name, "selflabel.batch_size", exp["selflabel"]["batch_size"], data, train, BATCH)
    if exp["method"] == "uno" and (uno := _uno_classes(exp)) is not None:
        known, novel = uno
        if "pretrain_supervised" in stages:
            _limit(name, "pretrain_supervised.batch_size", exp["pretrain_supervised"]["batch_size"], data, train,
                   BATCH, classes=known, which="known")
        if "discover" in stages:
            dc = exp["discover"]
            bs, batching = int(dc["batch_size"]), dc["batching"]
            if batching == "auto":  # ncd.methods.uno.resolve_batching: UNO's ImageNet data module pairs
                batching = "paired" if data.dataset.startswith("imagenet") else "mixed"
            if batching == "mixed":
                both = known + novel if isinstance(known, list) and isinstance(novel, list) else _count(known) + _count(novel)
                _limit(name, "discover.batch_size", bs, data, train, BATCH, classes=both, which="known and novel")
            elif bs < 2:
                raise NcdError(f"discover.batch_size {bs} of experiment '{name}' is too small for paired batches "
                               "(half known, half novel); expected at least 2")
            else:
                # an epoch of pairs is as long as the larger subset; each step takes bs // 2 pairs
                sizes = [data.images(train, c, cap=bs // 2, which=w) for c, w in ((known, "known"), (novel, "novel"))]
                if all(s is not None for s in sizes) and max(s[0] for s in sizes) < bs // 2:
                    raise NcdError(f"discover.batch_size {bs} of experiment '{name}' gives {bs // 2} known + "
                                   f"{bs // 2} novel images per step, more than the larger of {sizes[0][1]} and "
                                   f"{sizes[1][1]}; expected at most {2 * max(s[0] for s in sizes)}")
    if "sela" in stages:
        sc = exp["sela"]
        bs, label_bs = int(sc["batch_size"]), int(sc["eval_batch_size"]) or int(sc["batch_size"])
        if sc["drop_last"]:
            _limit(name, "sela.batch_size", bs, data, train, BATCH)
        n = (data.info["splits"].get(train) or {}).get("images")
        if n and _batch_norm(str(exp["backbone"])):
            # a train-mode BatchNorm cannot normalise a batch of one image (ncd.methods.sela._check_last_batch)
            for key, b, on in (("batch_size", bs, not sc["drop_last"]),
                               ("eval_batch_size", label_bs, sc["label_pass_mode"] == "train")):
                if on and n > 1 and n % b == 1:
                    raise NcdError(f"sela.{key} {b} of experiment '{name}' leaves a last batch of 1 of the {n} images "
                                   f"of {data.dataset}/{train}, which BatchNorm in train mode cannot normalise; "
                                   "expected a batch size that does not leave 1 image over")
        clusters("sela.num_clusters", sc["num_clusters"], train)
    if "cld" in stages:
        c, backbone, kwargs = exp["cld"], str(exp["backbone"]), exp.get("backbone_kwargs") or {}
        if backbone in ("resnet18_cifar", "resnet18_stl") and "init" in kwargs:
            raise NcdError(f"backbone_kwargs.init {kwargs['init']!r} of CLD experiment '{name}' clashes with "
                           f"cld.backbone_init {c['backbone_init']!r}, which sets the {backbone} init for CLD; "
                           "expected cld.backbone_init (torch or kaiming) and no backbone_kwargs.init")
        if int(c["pool_len"]) and backbone != "resnet18_cifar":  # ncd.models.cld.build_cld_backbone
            raise NcdError(f"cld.pool_len {c['pool_len']} of experiment '{name}' applies to the resnet18_cifar "
                           f"backbone only, but the backbone is '{backbone}'; expected cld.pool_len 0")
        drop_last = c["instance"] == "mocov2" if c["drop_last"] is None else bool(c["drop_last"])
        if drop_last:  # ncd.methods.cld.train_drop_last
            _limit(name, "cld.batch_size", c["batch_size"], data, train, BATCH)
    if "cld_probe" in stages:
        pc = exp["cld_probe"]
        devices = max(1, int(_runtime(exp, config)["devices"]))
        if pc["batch_size"] % devices:
            raise NcdError(f"cld_probe.batch_size {pc['batch_size']} of experiment '{name}' is the batch over all "
                           f"{devices} devices (runtime.devices) and must be a multiple of it; expected e.g. "
                           f"{max(1, pc['batch_size'] // devices) * devices}")
        _limit(name, "cld_probe.batch_size" + (" per device" if devices > 1 else ""),
               pc["batch_size"] // devices, data, train, BATCH)
    if "superand" in stages:
        split = split_of("superand.split", exp["superand"]["split"], "pretrain")
        _limit(name, "superand.batch_size", exp["superand"]["batch_size"], data, split, BATCH)
    if "twostage" in stages:
        ts = exp["twostage"]
        split = split_of("twostage.split", ts["split"], "train")
        _limit(name, "twostage.batch_size", ts["batch_size"], data, split, BATCH)
        clusters("twostage.num_classes", ts["num_classes"], split)


def load_config(files: list[Path]) -> dict[str, Any]:
    """Read YAML files, merge later ones into earlier ones (deep, as Snakemake does), validate."""
    config: dict[str, Any] = {}
    for f in files:
        if not Path(f).is_file():
            raise NcdError(f"config file {f} does not exist")
        _merge(config, yaml.safe_load(Path(f).read_text()) or {})
    return validate(config)


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def selected_experiments(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The experiments this run builds (``run_experiments`` or all)."""
    names = config.get("run_experiments") or list(config["experiments"])
    return {n: config["experiments"][n] for n in names}


def resolve_experiment(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The block a stage receives: the experiment with global runtime/download/seeds folded in."""
    exp = copy.deepcopy(config["experiments"][name])
    # schema defaults first: a config that sets part of runtime still gets the rest
    defaults = _schema()["properties"]["runtime"]["default"]
    exp["runtime"] = {**defaults, **config.get("runtime", {}), **(exp.get("runtime") or {})}
    if exp.get("download") is None:
        exp["download"] = config.get("download", True)
    if exp.get("seeds") is None:
        exp["seeds"] = list(config.get("seeds", [0]))
    return exp


def check_experiment(name: str, exp: dict[str, Any]) -> dict[str, Any]:
    """Validate one resolved experiment block (what ``python -m ncd <stage> --config`` gets)."""
    schema = _schema()
    sub = {**schema, "type": "object", "required": ["experiments"], "additionalProperties": False,
           "properties": {"experiments": schema["properties"]["experiments"]}}
    # a stage's slice lacks the other stages' blocks: the checks across blocks ran in the workflow
    validate({"experiments": {name: exp}}, sub, data_checks=False)
    return exp


# --- per-stage slices ---------------------------------------------------------------------------

def _slice_keys(stage: str, evaluate: bool = False) -> tuple[str, ...]:
    st = STAGES[stage]
    return SHARED_KEYS + st.blocks + (EVALUATE_BLOCKS if evaluate else ())


def resolved_augment(augment: dict[str, Any], stage: str) -> dict[str, Any]:
    """The experiment's ``augment`` block as ``stage`` sees it: ``augment.stages[stage]`` (when named)
    replaces ``backend`` and ``stages`` is dropped, so a stage's slice and hash change only when its
    own backend does."""
    out = {k: v for k, v in augment.items() if k != "stages"}
    per = augment.get("stages") or {}
    if stage in per:
        out["backend"] = per[stage]
    return out


def stage_backends(exp: dict[str, Any]) -> dict[str, str]:
    """The augmentation backend each stage of the experiment runs with (``augment.backend``, or its
    ``augment.stages`` override)."""
    aug = exp.get("augment") or {}
    return {st.name: str(resolved_augment(aug, st.name).get("backend", "pil")) for st in stages_of(exp["method"])}


def stage_slice(exp: dict[str, Any], stage: str, evaluate: bool = False) -> dict[str, Any]:
    """What ``stage`` (or, with ``evaluate``, the evaluation of its artifact) receives and hashes.

    The shared keys that change any computation, the stage's own config blocks, and under
    ``upstream`` the hashes of the slices of the stages it reads, so that a change upstream still
    reaches everything downstream. ``exp`` is a resolved experiment (:func:`resolve_experiment`).
    """
    if stage not in STAGES:
        raise NcdError(f"unknown stage {stage!r}; expected one of: {', '.join(STAGES)}")
    out = {k: copy.deepcopy(exp[k]) for k in _slice_keys(stage, evaluate) if k in exp}
    # cluster requests (memory, time limit, the GPU ask) change no result
    out["runtime"] = {k: v for k, v in out.get("runtime", {}).items() if k not in RUNTIME_REQUESTS}
    if isinstance(out.get("augment"), dict):
        out["augment"] = resolved_augment(out["augment"], stage)
    ups = {stage: stage_hash(exp, stage)} if evaluate else \
        {up: stage_hash(exp, up) for up in STAGES[stage].inputs_for(exp).values()}
    if ups:
        out["upstream"] = ups
    return out


def stage_hash(exp: dict[str, Any], stage: str, evaluate: bool = False) -> str:
    """The hash of a stage's slice: what its config record and its last.ckpt sidecar hold."""
    return config_hash(stage_slice(exp, stage, evaluate))


def stage_config(config: dict[str, Any], name: str, stage: str, evaluate: bool = False) -> dict[str, Any]:
    """The slice of experiment ``name`` of a validated workflow config for ``stage``."""
    return stage_slice(resolve_experiment(config, name), stage, evaluate)


class StageConfig(dict):
    """A stage's slice of its experiment's config. Reading a top-level key outside the slice is an
    error, so a stage cannot depend on a key its hash (and so the workflow) does not see."""

    def __init__(self, data: dict[str, Any], stage: str, allowed: Iterable[str]) -> None:
        super().__init__(data)
        self.stage = stage
        self.allowed = frozenset(allowed)

    def _check(self, key: str) -> None:
        if key not in self.allowed:
            raise NcdError(f"stage '{self.stage}' reads config key '{key}', which is not in its slice "
                           f"({', '.join(sorted(self.allowed))}); declare the block in the stage's "
                           "entry of ncd/stages.py")

    def __getitem__(self, key: str) -> Any:
        self._check(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self._check(key)
        return super().get(key, default)

    def __reduce__(self):
        return (StageConfig, (dict(self), self.stage, self.allowed))


def check_stage_config(name: str, stage: str, cfg: dict[str, Any], evaluate: bool = False) -> StageConfig:
    """Validate the slice a stage command receives (``--config``): defaults are filled in, keys
    outside the slice are dropped, and reading one of them later fails loudly."""
    if stage not in STAGES:
        raise NcdError(f"unknown stage {stage!r}; expected one of: {', '.join(STAGES)}")
    cfg = copy.deepcopy(cfg)
    upstream = cfg.pop("upstream", None)
    check_experiment(name, cfg)
    method = STAGES[stage].method
    if cfg["method"] != method:
        raise NcdError(f"stage '{stage}' belongs to method '{method}', but experiment '{name}' has method "
                       f"'{cfg['method']}'; expected an experiment of method '{method}'")
    keys = _slice_keys(stage, evaluate)
    data = {k: cfg[k] for k in keys if k in cfg}
    if upstream is not None:
        data["upstream"] = upstream
    return StageConfig(data, stage, (*keys, "upstream"))
