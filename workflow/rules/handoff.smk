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
#
# "Will rerun" must include what Snakemake alone knows. That pass also stops at an ancient() edge
# whose file exists, so a job downstream of a rerun that reaches it only through such edges is
# never looked at, not even for its missing outputs. After a `kill -9` of Snakemake whose jobs
# finished as orphans (artifact and record written), --rerun-incomplete forces those jobs; were
# their consumers' edges ancient, the run would end after the forced jobs alone and exit 0 with
# metrics.csv and the report missing. Hence (see :func:`settled`): an edge is ancient only while
# its producer, and every job upstream of it, is up to date by its record and not forced by this
# invocation (incomplete markers under --rerun-incomplete, -R/--forcerun, -F); and a job whose own
# outputs are missing takes plain edges (it runs anyway; any rerun upstream then reaches it).
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


def _forced_by_snakemake(rule_name, paths):
    """Whether this invocation reruns the job of ``rule_name`` that writes ``paths`` whatever its files say:
    -F, -R/--forcerun naming the rule or a file, or its outputs marked incomplete (a Snakemake that was
    killed while the job ran) under --rerun-incomplete."""
    settings = workflow.dag_settings
    if settings is None:
        return False
    forced = set(settings.forcerun or ())
    if settings.forceall or rule_name in forced or not forced.isdisjoint(paths):
        return True
    persistence = workflow.persistence
    if not settings.force_incomplete or persistence is None:
        return False  # without --rerun-incomplete, Snakemake refuses to run over an incomplete marker
    # the one query both persistence backends (file, db) answer without a job object; the key of an
    # output is its path as the rule writes it, which is how ``paths`` are built
    return bool(persistence._filter_incomplete_keys(paths))


def settled(exp, seed, stage, evaluate=False):
    """Whether no job that makes ``stage``'s artifact (or its evaluation) or anything upstream of it will
    run in this invocation, as far as the records and Snakemake's force settings tell: only then may an
    edge to it be ancient (see above)."""
    out_dir = f"{RESULTS}/{exp}/seed{seed}/{stage}"
    producer = "evaluate" if evaluate else stage
    artifact = f"{out_dir}/metrics.json" if evaluate else f"{out_dir}/{STAGES[stage].output}"
    if not up_to_date(exp, seed, stage, evaluate) or _forced_by_snakemake(producer, [artifact, record_of(producer, out_dir)]):
        return False
    upstream = [stage] if evaluate else list(STAGES[stage].inputs_for(exp_cfg(exp)).values())
    return all(settled(exp, seed, up) for up in upstream)


def handed_off(path, current):
    """An artifact input: ancient while its producer is ``current`` (settled, see above), plain otherwise."""
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
        own = f"{out_dir}/metrics.json" if evaluate else f"{out_dir}/{st.output}"
        runs_anyway = recorded != h or not os.path.exists(own)  # its own reasons make it run
        for name, up in ups.items():
            current = not runs_anyway and settled(wildcards.exp, wildcards.seed, up)
            res[name] = handed_off(f"{run}/{up}/{STAGES[up].output}", current)
        return res

    return inputs


def aggregate_inputs(table):
    """Input function of aggregate: every run's metrics.json, ancient while settled; all plain while the
    metrics ``table`` is missing (aggregate runs anyway, and any evaluation that runs reaches it)."""

    def inputs(wildcards):
        missing = not os.path.exists(table)
        return [handed_off(m, not missing and settled(exp, seed, stage, evaluate=True))
                for m, exp, seed, stage in metrics_targets(with_keys=True)]

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
    "--config {params.cfg} --data-root {params.root:q} {params.inputs} --out {output.artifact} --log {log} "
    f"--threads {{threads}}{RECORD}"
)
