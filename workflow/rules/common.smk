# Helpers and target lists; no rules here.
import json
import os
import shlex
import signal

# SLURM sends SIGUSR1 to every process of a job step before the time limit (slurm.signal_seconds):
# Snakemake and the shell around a training step must survive it (its default action is to
# terminate) so that the training process, which handles it, can save and exit cleanly.
signal.signal(signal.SIGUSR1, signal.SIG_IGN)

from ncd.config import resolve_experiment, selected_experiments, validate
from ncd.methods.registry import EVALUATED_STAGES

# Validation fills in every default, so rules read complete blocks; errors name the bad key.
validate(config)

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
    stage="[a-z_]+",
    dataset="[a-z0-9_.+-]+",


def exp_cfg(exp):
    """The resolved config block of an experiment (what the stage command receives)."""
    return resolve_experiment(config, exp)


# Keys that do not change what a stage computes: left out of its --config, so that adding a
# seed or renaming a report variant does not rerun every existing run.
NOT_FOR_STAGES = ("seeds", "variant")


# Cluster requests (memory, time limit) do not change a result either.
NOT_FOR_STAGES_RUNTIME = ("mem_mb", "time_min")


def exp_json(wildcards):
    """The experiment block as a shell-quoted JSON argument; a change reruns the rule."""
    cfg = {k: v for k, v in exp_cfg(wildcards.exp).items() if k not in NOT_FOR_STAGES}
    cfg["runtime"] = {k: v for k, v in cfg["runtime"].items() if k not in NOT_FOR_STAGES_RUNTIME}
    return shlex.quote(json.dumps(cfg, sort_keys=True))


# --- Hand-off of pulled artifacts (DVC) -------------------------------------------------------
# `dvc pull` restores results/ without modification times that mean anything, and without
# Snakemake's metadata. So (1) every input that is another rule's artifact is ancient(): an
# artifact's age never triggers a rerun; (2) each job writes the hash of the config it ran with
# next to its output (a "record", versioned with it), and takes as input a stamp file whose
# modification time is set here, at parse time: long ago when the record equals the current config,
# now when it does not. A changed parameter thus reruns the job on any clone, a pulled result that
# matches is up to date, and no job depends on a download it does not need.
STAMPS = f"{RESULTS}/.stamps"


def config_hash_of(wildcards):
    """The hash a job records: the same experiment block its command receives."""
    import hashlib

    return hashlib.sha256(exp_json(wildcards).encode()).hexdigest()[:16]


def record_of(rule, out_dir):
    """Output path of ``rule``'s config record, next to its artifact in ``out_dir`` (a RUN pattern)."""
    return f"{out_dir}/.{rule}.config"


def _fill(pattern, wildcards):
    """A path pattern with this job's wildcards filled in."""
    return pattern.format(**dict(wildcards.items()))


def _read_stripped(path):
    """A small text file's content, or None when it does not exist."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


def artifact_inputs(rule, out_dir, **artifacts):
    """Input function for ``input: unpack(artifact_inputs(...))``: upstream artifacts (ancient),
    the config stamp, and the dataset's READY marker when the job may have to run."""

    def inputs(wildcards):
        h = config_hash_of(wildcards)
        recorded = _read_stripped(record_of(rule, _fill(out_dir, wildcards)))
        stage = f"_{wildcards.stage}" if "stage" in wildcards.keys() else ""
        # one folder per stamp: Snakemake lists a folder once per DAG build (its file inventory),
        # so a stamp created in a folder it had already listed would look missing
        stamp = f"{STAMPS}/{rule}/{wildcards.exp}_seed{wildcards.seed}{stage}/config"
        os.makedirs(os.path.dirname(stamp), exist_ok=True)
        if recorded == h:
            if not os.path.exists(stamp):
                open(stamp, "w").close()
            os.utime(stamp, (1, 1))  # up to date: the stamp is older than any output
        elif _read_stripped(stamp) != h or os.path.getmtime(stamp) <= 1:
            with open(stamp, "w") as f:  # changed (or never run): newer than the output
                f.write(f"{h}\n")
        res = {"stamp": stamp}
        ready = ready_marker(wildcards)
        # a pulled, matching result needs no data; anything that will run does
        if recorded != h or os.path.exists(ready):
            res["ready"] = ready
        for name, pattern in artifacts.items():
            res[name] = ancient(_fill(pattern, wildcards))
        return res

    return inputs


RECORD = " && printf '%s\\n' {params.config_hash} > {output.record}"


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
    """GPUs one job of this experiment uses: runtime.devices when runtime.gpu, else none."""
    rt = runtime(wildcards.exp)
    return int(rt["devices"]) if rt["gpu"] else 0


def devices_of(wildcards):
    """Training processes of one job: runtime.devices on GPUs (one per GPU), else 1."""
    return max(1, gpus_of(wildcards))


# SLURM requests (the slurm profile's executor reads them; local runs ignore them). Account and
# partition come from the environment so one profile serves every cluster and user.
SLURM = config["slurm"]
SLURM_ACCOUNT = os.environ.get("NCD_SLURM_ACCOUNT", "")  # empty: the user's default account
SLURM_PARTITION = os.environ.get("NCD_SLURM_PARTITION", "")  # empty: the cluster's default partition


def _slurm_extra(wildcards):
    sec = SLURM["signal_seconds"]
    # without "B:" SLURM signals the job steps (the training process), not the batch shell
    return f"--signal=USR1@{sec}" if sec else ""


def train_resources(multi_gpu=True, gpu=True):
    """Resources of a training or evaluation rule, for ``resources: **train_resources()``.

    ``multi_gpu=False``: rules that run on one device whatever runtime.devices says (neighbour
    mining, evaluation); ``gpu=False``: rules that never use a GPU (k-means on pixels).

    Memory and time limit scale with the attempt, so a retry (profile ``retries``) asks for more;
    ``cpus_per_task`` equals the rule's threads; GPUs are asked for as ``gpu`` (sbatch --gpus) or
    ``gres`` (sbatch --gres) by ``slurm.gpu_request``. A job with several devices asks for one task
    per GPU, and the executor leaves the task launch to the rule (``mpi``), which starts them with
    srun so that Lightning's SLURM environment sets up DDP.
    """
    def n_gpus(wildcards):
        if not gpu:
            return 0
        return gpus_of(wildcards) if multi_gpu else min(1, gpus_of(wildcards))

    def n_tasks(wildcards):
        return max(1, n_gpus(wildcards))

    def gres(wildcards):
        n, model = n_gpus(wildcards), SLURM["gpu_model"]
        return (f"gpu:{model}:{n}" if model else f"gpu:{n}") if n else ""

    res = {
        "cpus_per_task": threads_of,
        "mem_mb": lambda wildcards, attempt: int(runtime(wildcards.exp)["mem_mb"]) * attempt,
        "runtime": lambda wildcards, attempt: int(runtime(wildcards.exp)["time_min"]) * attempt,
        "slurm_extra": _slurm_extra,
        # informational: `snakemake -n` lists resources but not a job's container, so name it here
        "container": CONTAINER or "none",
        "tasks": n_tasks,
        # one task per GPU (the plugin would otherwise ask for `tasks` tasks per GPU)
        "tasks_per_gpu": lambda wildcards: 1 if n_gpus(wildcards) else None,
        # several GPUs: the executor runs the rule in the batch step and the rule's srun starts the tasks
        "mpi": lambda wildcards: "srun" if n_tasks(wildcards) > 1 else None,
    }
    if SLURM_ACCOUNT:
        res["slurm_account"] = SLURM_ACCOUNT
    if SLURM_PARTITION:
        res["slurm_partition"] = SLURM_PARTITION
    if SLURM["gpu_request"] == "gres":
        res["gres"] = gres
    else:
        res["gpu"] = n_gpus
        if SLURM["gpu_model"]:
            res["gpu_model"] = SLURM["gpu_model"]
    return res


def bind_outside_workdir():
    """Bind data_dir, results_dir, reports_dir and any experiment's data_path into the container when
    they lie outside the working directory (Snakemake binds only that one, as the container's home)."""
    from snakemake_interface_executor_plugins.settings import DeploymentMethod

    settings = workflow.deployment_settings
    if settings is None or DeploymentMethod.APPTAINER not in settings.deployment_method:
        return
    cwd = os.getcwd()
    paths = [DATA, RESULTS, REPORTS] + [cfg["data_path"] for cfg in EXPERIMENTS.values() if cfg.get("data_path")]
    args = settings.apptainer_args or ""
    for path in dict.fromkeys(os.path.abspath(p) for p in paths):
        if path == cwd or path.startswith(cwd + os.sep) or f"--bind {path}" in args:
            continue
        os.makedirs(path, exist_ok=True)  # apptainer refuses to bind a missing folder
        args += f" --bind {shlex.quote(path)}"
    settings.apptainer_args = args.strip()


bind_outside_workdir()


def launcher(wildcards):
    """The command prefix that starts one training process per GPU of a multi-GPU job.

    Inside a SLURM job, outside a container: ``srun`` with one task per GPU (Lightning reads
    SLURM_NTASKS/SLURM_PROCID). Elsewhere (a laptop, or inside the Apptainer image, which has no
    srun): nothing, and Lightning starts the DDP processes itself.
    """
    n = devices_of(wildcards)
    if n <= 1:
        return ""
    srun = f"srun --ntasks={n} --ntasks-per-node={n} --kill-on-bad-exit=1"
    return f'$(if [ -n "${{SLURM_JOB_ID:-}}" ] && command -v srun >/dev/null; then echo "{srun}"; fi) '


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
