# Helpers and target lists; no rules here.
import json
import os
import shlex

from ncd.config import resolve_experiment, selected_experiments, validate
from ncd.methods.registry import EVALUATED_STAGES

# Validation fills in every default, so rules read complete blocks; errors name the bad key.
validate(config)

DATA = config["data_dir"]
RESULTS = config["results_dir"]
REPORTS = config["reports_dir"]
EXPERIMENTS = selected_experiments(config)
RUN = f"{RESULTS}/{{exp}}/seed{{seed}}"


wildcard_constraints:
    exp="[A-Za-z0-9_.-]+",
    seed=r"\d+",
    stage="[a-z_]+",
    dataset="[a-z0-9_.+-]+",


def exp_cfg(exp):
    """The resolved config block of an experiment (what the stage command receives)."""
    return resolve_experiment(config, exp)


# Keys that do not change what a stage computes: left out of its --config, so that adding a
# seed or renaming a report variant does not rerun every existing run.
NOT_FOR_STAGES = ("seeds", "variant")


def exp_json(wildcards):
    """The experiment block as a shell-quoted JSON argument; a change reruns the rule."""
    cfg = {k: v for k, v in exp_cfg(wildcards.exp).items() if k not in NOT_FOR_STAGES}
    return shlex.quote(json.dumps(cfg, sort_keys=True))


def data_key(dataset):
    """The folder a dataset lives in: ImageNet subsets share the ImageNet folder."""
    return "imagenet" if dataset.startswith("imagenet") else dataset


def data_root(wildcards):
    cfg = exp_cfg(wildcards.exp)
    return cfg["data_path"] or f"{DATA}/{data_key(cfg['dataset'])}"


def ready_marker(wildcards):
    return f"{data_root(wildcards)}/READY"


def runtime(exp):
    return exp_cfg(exp)["runtime"]


def threads_of(wildcards):
    return runtime(wildcards.exp)["threads"]


def gpus_of(wildcards):
    return 1 if runtime(wildcards.exp)["gpu"] else 0


def seeds_of(exp):
    return exp_cfg(exp)["seeds"]


def metrics_targets():
    """Every metrics.json the selected experiments produce."""
    return [
        f"{RESULTS}/{exp}/seed{seed}/{stage}/metrics.json"
        for exp, cfg in EXPERIMENTS.items()
        for seed in seeds_of(exp)
        for stage in EVALUATED_STAGES[cfg["method"]]
    ]


def method_of(wildcards):
    return exp_cfg(wildcards.exp)["method"]
