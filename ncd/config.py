"""Load, validate and resolve the workflow configuration, and cut it into per-stage slices.

The schema is package data (``ncd/schema/config.schema.yaml`` plus one file per config block in
``ncd/schema/blocks/``), so the installed package validates a config without the repository. Used
by the Snakefile (validation with defaults filled in, the slice each job receives and hashes) and
by the command line (each stage checks the slice it receives), so both give the same clear errors.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ncd.errors import NcdError
from ncd.stages import EVALUATE_BLOCKS, METHODS, RUNTIME_REQUESTS, SHARED_KEYS, STAGES
from ncd.utils import config_hash

SCHEMA_DIR = Path(__file__).resolve().parent / "schema"
SCHEMA_PATH = SCHEMA_DIR / "config.schema.yaml"


def schema() -> dict[str, Any]:
    """The whole config schema: the top level, every config block, and the methods of the stage table."""
    # parsed once: the workflow resolves experiments for every job of the DAG; callers only read it
    global _SCHEMA_CACHE
    if _SCHEMA_CACHE is None:
        full = yaml.safe_load(SCHEMA_PATH.read_text())
        props = full["definitions"]["experiment"]["properties"]
        for f in sorted((SCHEMA_DIR / "blocks").glob("*.yaml")):
            props[f.stem] = yaml.safe_load(f.read_text())
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


def validate(config: dict[str, Any], schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate ``config`` in place against the schema, filling defaults; return it."""
    v = _validator(schema or _schema())
    errors = list(v.iter_errors(config))
    if errors:
        raise NcdError(_explain(jsonschema.exceptions.best_match(errors)))
    check_semantics(config)
    return config


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
    # lazily: ncd.data imports torch, and the Snakefile imports this module for every parse
    from ncd.data import get_info

    if exp["dataset"] == "imagefolder":
        folder = exp.get("data_path")
        if not folder or not Path(folder).is_dir():
            return  # a user's folder: its classes can only be counted once it is there
        n = get_info("imagefolder", folder).num_classes
    else:
        n = get_info(exp["dataset"]).num_classes
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


def check_semantics(config: dict[str, Any]) -> None:
    """Checks the schema cannot express."""
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
    validate({"experiments": {name: exp}}, sub)
    return exp


# --- per-stage slices ---------------------------------------------------------------------------

def _slice_keys(stage: str, evaluate: bool = False) -> tuple[str, ...]:
    st = STAGES[stage]
    return SHARED_KEYS + st.blocks + (EVALUATE_BLOCKS if evaluate else ())


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
