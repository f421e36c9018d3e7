rule evaluate:
    """Metrics of one stage's artifact on the evaluation splits (the stage's own evaluator, ncd/stages.py)."""
    input:
        unpack(stage_inputs("evaluate", evaluate=True)),
    output:
        metrics=f"{RUN}/{{stage}}/metrics.json",
        record=record_of("evaluate", f"{RUN}/{{stage}}"),
    params:
        cfg=slice_json(evaluate=True),
        config_hash=slice_hash(evaluate=True),
        root=data_root,
    log:
        f"{RESULTS}/logs/evaluate/{{exp}}_seed{{seed}}_{{stage}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{exp}}_seed{{seed}}_{{stage}}.tsv"
    threads: threads_of
    resources:
        **train_resources(multi_gpu=False),
    container: CONTAINER
    shell:
        (
            "python -m ncd evaluate --experiment {wildcards.exp} --seed {wildcards.seed} --config {params.cfg} "
            "--data-root {params.root:q} --ckpt {input.model} --stage {wildcards.stage} "
            "--out {output.metrics} --log {log} --threads {threads}"
            + RECORD
        )


rule aggregate:
    """All runs' metrics.json -> the one metrics table the report reads."""
    input:
        metrics=aggregate_inputs(f"{RESULTS}/metrics.csv"),
    output:
        table=report(f"{RESULTS}/metrics.csv", caption="../report/metrics.rst", category="Tables"),
    log:
        f"{RESULTS}/logs/aggregate.log",
    benchmark:
        f"{RESULTS}/benchmarks/aggregate/all.tsv"
    container: CONTAINER
    shell:
        "python -m ncd aggregate --out {output.table} --log {log} {input.metrics}"
