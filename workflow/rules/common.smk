# Helpers and target lists; no rules here. The DVC hand-off is in handoff.smk, cluster requests in
# cluster.smk.
import json
import os
import shlex
import signal
import sys

# SLURM sends SIGUSR1 to every process of a job step before the time limit (slurm.signal_seconds):
# Snakemake and the shell around a training step must survive it (its default action is to
# terminate) so that the training process, which handles it, can save and exit cleanly.
signal.signal(signal.SIGUSR1, signal.SIG_IGN)

from functools import lru_cache

from ncd.config import resolve_experiment, selected_experiments, stage_config, validate
from ncd.errors import NcdError
from ncd.stages import STAGES, evaluated_stages
from ncd.utils import config_hash, dataset_marker

# Validation fills in every default, so rules read complete blocks; errors name the bad key.
try:
    validate(config)
except NcdError as e:
    # bad input, as `python -m ncd` reports it: one line and status 2, not Snakemake's traceback of
    # this file (SystemExit passes through Snakemake's handlers, which catch Exception only)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)

DATA = config["data_dir"]
RESULTS = config["results_dir"]
REPORTS = config["reports_dir"]
EXPERIMENTS = selected_experiments(config)
# the image of every training, evaluation and aggregation rule; `--config container=none` (or an
# empty value) runs them without one, e.g. on a cluster without Apptainer
CONTAINER = None if str(config["container"]).strip().lower() in ("", "none", "null") else config["container"]
RUN = f"{RESULTS}/{{exp}}/seed{{seed}}"


wildcard_constraints:
    exp="[A-Za-z0-9_.-]+",
    seed=r"\d+",
    stage="|".join(s.name for s in STAGES.values() if s.evaluate),
    dataset="[a-z0-9_.+-]+",


def exp_cfg(exp):
    """The resolved config block of an experiment (global runtime, download and seeds folded in)."""
    return resolve_experiment(config, exp)


# --- Per-stage config slices ------------------------------------------------------------------
# A job receives, records and hashes only its stage's slice of the experiment (ncd.config.
# stage_slice): the shared keys, the stage's own blocks and the hashes of its upstream stages. So a
# changed key reruns exactly the stages that read it and everything downstream of them.
@lru_cache(maxsize=None)
def _slice_json(exp, stage, evaluate):
    return json.dumps(stage_config(config, exp, stage, evaluate), sort_keys=True)


def _stage_of(stage, wildcards):
    return stage or wildcards.stage


def slice_json(stage=None, evaluate=False):
    """params: the stage's slice as a shell-quoted JSON argument (``stage=None``: the {stage} wildcard)."""
    return lambda wildcards: shlex.quote(_slice_json(wildcards.exp, _stage_of(stage, wildcards), evaluate))


@lru_cache(maxsize=None)
def _slice_hash(exp, stage, evaluate):
    return config_hash(json.loads(_slice_json(exp, stage, evaluate)))


def slice_hash(stage=None, evaluate=False):
    """params: the hash a job records next to its output (the same as its last.ckpt sidecar's)."""
    return lambda wildcards: _slice_hash(wildcards.exp, _stage_of(stage, wildcards), evaluate)


def data_key(dataset):
    """The folder a dataset lives in: ImageNet subsets share the ImageNet folder."""
    return "imagenet" if dataset.startswith("imagenet") else dataset


def data_root(wildcards):
    cfg = exp_cfg(wildcards.exp)
    return cfg["data_path"] or f"{DATA}/{data_key(cfg['dataset'])}"


def ready_marker(wildcards):
    """The READY marker a job of an experiment waits for: data_dir/<dataset>/READY, or for a dataset in a
    folder of its own (data_path) a marker under data_dir/folders/ (the user's folder is only read)."""
    cfg = exp_cfg(wildcards.exp)
    return dataset_marker(DATA, cfg["dataset"], cfg["data_path"], data_key(cfg["dataset"]))


def runtime(exp):
    return exp_cfg(exp)["runtime"]


def threads_of(wildcards):
    return runtime(wildcards.exp)["threads"]


def gpus_of(wildcards):
    """GPUs one job of this experiment uses: runtime.devices when runtime.gpu, else none."""
    rt = runtime(wildcards.exp)
    return int(rt["devices"]) if rt["gpu"] else 0


def devices_of(wildcards):
    """Training processes of one job: runtime.devices on GPUs (one per GPU), else 1."""
    return max(1, gpus_of(wildcards))


# SLURM requests (the slurm profile's executor reads them; local runs ignore them). Account and


def seeds_of(exp):
    return exp_cfg(exp)["seeds"]


def metrics_targets(with_keys=False):
    """Every metrics.json the selected experiments produce (with ``with_keys``: ``(path, exp, seed, stage)``):
    the evaluated stages each experiment's config enables (e.g. cld_probe only when cld_probe.epochs > 0)."""
    targets = [
        (f"{RESULTS}/{exp}/seed{seed}/{stage}/metrics.json", exp, seed, stage)
        for exp, cfg in EXPERIMENTS.items()
        for seed in seeds_of(exp)
        for stage in evaluated_stages(cfg["method"], cfg)
    ]
    return targets if with_keys else [t[0] for t in targets]


def stage_rule_args(st):
    """The per-stage values of a stage's rule, bound here (lambdas in a loop would see later values)."""
    return {
        "output": f"{RUN}/{st.name}/{st.output}",
        "record": record_of(st.name, f"{RUN}/{st.name}"),
        "log": f"{RESULTS}/logs/{st.name}/{{exp}}_seed{{seed}}.log",
        "benchmark": f"{RESULTS}/benchmarks/{st.name}/{{exp}}_seed{{seed}}.tsv",
        "launch": launcher if st.multi_device else "",
        "resources": train_resources(multi_gpu=st.multi_device, gpu=st.gpu),
    }
