# Cluster requests: SLURM resources, container binds, the multi-GPU launcher.


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
