# The DVC hand-off: what a job takes as input and records, so pulled results stay up to date.


# --- Hand-off of pulled artifacts (DVC) -------------------------------------------------------
# `dvc pull` restores results/ without modification times that mean anything, and without
# Snakemake's metadata. So (1) every input that is another rule's artifact is ancient(): an
# artifact's age never triggers a rerun; (2) each job writes the hash of the config it ran with
# next to its output (a "record", versioned with it), and takes as input a stamp file whose
# modification time is set here, at parse time: long ago when the record equals the current config,
# now when it does not. A changed parameter thus reruns the job on any clone, a pulled result that
# matches is up to date, and no job depends on a download it does not need.
STAMPS = f"{RESULTS}/.stamps"


def record_of(rule, out_dir):
    """Output path of ``rule``'s config record, next to its artifact in ``out_dir`` (a RUN pattern)."""
    return f"{out_dir}/.{rule}.config"


def _read_stripped(path):
    """A small text file's content, or None when it does not exist."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


def stage_inputs(rule, stage=None, evaluate=False):
    """Input function for ``input: unpack(stage_inputs(...))``: the upstream artifacts a stage reads
    under its experiment's config (ancient), the config stamp, and the dataset's READY marker when
    the job may have to run. ``evaluate``: the evaluation of the stage's own artifact."""

    def inputs(wildcards):
        st = STAGES[_stage_of(stage, wildcards)]
        h = slice_hash(st.name, evaluate)(wildcards)
        out_dir = f"{RESULTS}/{wildcards.exp}/seed{wildcards.seed}/{st.name}"
        recorded = _read_stripped(record_of(rule, out_dir))
        suffix = f"_{st.name}" if evaluate else ""
        # one folder per stamp: Snakemake lists a folder once per DAG build (its file inventory),
        # so a stamp created in a folder it had already listed would look missing
        stamp = f"{STAMPS}/{rule}/{wildcards.exp}_seed{wildcards.seed}{suffix}/config"
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
        run = f"{RESULTS}/{wildcards.exp}/seed{wildcards.seed}"
        ups = {"model": st.name} if evaluate else st.inputs_for(exp_cfg(wildcards.exp))
        for name, up in ups.items():
            res[name] = ancient(f"{run}/{up}/{STAGES[up].output}")
        return res

    return inputs


def input_flags(stage):
    """params: ``--<name> <path>`` for each upstream artifact the stage command reads."""
    names = list(STAGES[stage].inputs)
    return lambda wildcards, input: " ".join(
        f"--{n.replace('_', '-')} {input[n]}" for n in names if n in input.keys())


RECORD = " && printf '%s\\n' {params.config_hash} > {output.record}"


# The command of every stage's rule; params.stage is the stage, i.e. the sub-command. One constant: Snakemake
# evaluates a rule's shell directive when the job runs, after the loop over the stages has ended.
STAGE_SHELL = (
    "{params.launch}python -m ncd {params.stage} --experiment {wildcards.exp} --seed {wildcards.seed} "
    "--config {params.cfg} --data-root {params.root} {params.inputs} --out {output.artifact} --log {log} "
    f"--threads {{threads}}{RECORD}"
)
