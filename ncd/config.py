"""Load, validate and resolve the workflow configuration (workflow/schemas/config.schema.yaml).

Used by the Snakefile (validation with defaults filled in) and by the command line (each stage
checks the experiment block it receives), so both give the same clear errors.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from ncd.errors import NcdError

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def _schema() -> dict[str, Any]:
    # parsed once: the workflow resolves experiments for every job of the DAG; callers only read it
    global _SCHEMA_CACHE
    if _SCHEMA_CACHE is None:
        _SCHEMA_CACHE = yaml.safe_load(SCHEMA_PATH.read_text())
    return _SCHEMA_CACHE


_SCHEMA_CACHE: dict[str, Any] | None = None


def _validator(schema: dict[str, Any]):
    """A Draft-7 validator that fills in ``default`` values as it descends."""
    import jsonschema

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
    import jsonschema

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
