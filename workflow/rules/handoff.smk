# The DVC hand-off: what a job takes as input and records, so pulled results stay up to date.


# --- Hand-off of pulled artifacts (DVC) -------------------------------------------------------
# `dvc pull` restores results/ without modification times that mean anything, and without
# Snakemake's metadata. So (1) each job writes the hash of its config slice next to its output (a
# "record", versioned with it), and takes as input a stamp file whose modification time is set
# here, at parse time: long ago when the record equals the current slice, now when it does not;
# (2) an input that is another job's artifact is ancient() while that job is up to date by its
# record: a pulled artifact's age never triggers a rerun. An upstream job that will rerun (its
# record differs, or its artifact is missing) is a plain input instead, so that Snakemake's
# needrun pass, which skips the own reasons of every job downstream of a rerun, still reaches
# them through the edge, in the same invocation. A changed key thus reruns exactly the jobs whose
# slices it changes, on any clone; a pulled result that matches is up to date; and no job depends
# on a download it does not need.
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


def up_to_date(exp, seed, stage, evaluate=False):
    """Whether the job of ``stage`` (or its evaluation) has its artifact and a record of its current slice."""
    out_dir = f"{RESULTS}/{exp}/seed{seed}/{stage}"
    artifact = f"{out_dir}/metrics.json" if evaluate else f"{out_dir}/{STAGES[stage].output}"
    recorded = _read_stripped(record_of("evaluate" if evaluate else stage, out_dir))
    return os.path.exists(artifact) and recorded == _slice_hash(exp, stage, evaluate)


def handed_off(path, current):
    """An artifact input: ancient while its producer is up to date (see above), plain otherwise."""
    return ancient(path) if current else path


def stage_inputs(rule, stage=None, evaluate=False):
    """Input function for ``input: unpack(stage_inputs(...))``: the upstream artifacts a stage reads
    under its experiment's config (see :func:`handed_off`), the config stamp, and the dataset's READY marker when
    the job may have to run. ``evaluate``: the evaluation of the stage's own artifact."""

    def inputs(wildcards):
        st = STAGES[_stage_of(stage, wildcards)]
        h = _slice_hash(wildcards.exp, st.name, evaluate)
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
            res[name] = handed_off(f"{run}/{up}/{STAGES[up].output}", up_to_date(wildcards.exp, wildcards.seed, up))
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
