rule evaluate:
    """Metrics of one stage's model on the evaluation splits (SCAN's Hungarian protocol, kNN)."""
    input:
        unpack(artifact_inputs("evaluate", f"{RUN}/{{stage}}", model=f"{RUN}/{{stage}}/model.ckpt")),
    output:
        metrics=f"{RUN}/{{stage}}/metrics.json",
        record=record_of("evaluate", f"{RUN}/{{stage}}"),
    params:
        cfg=exp_json,
        config_hash=config_hash_of,
        root=data_root,
        method=method_of,
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
            "--data-root {params.root} --ckpt {input.model} --method {params.method} --stage {wildcards.stage} "
            "--out {output.metrics} --log {log} --threads {threads}"
            + RECORD
        )


rule aggregate:
    """All runs' metrics.json -> the one metrics table the report reads."""
    input:
        metrics=[ancient(m) for m in metrics_targets()],
    output:
        table=f"{RESULTS}/metrics.csv",
    log:
        f"{RESULTS}/logs/aggregate.log",
    benchmark:
        f"{RESULTS}/benchmarks/aggregate/all.tsv"
    container: CONTAINER
    shell:
        "python -m ncd aggregate --out {output.table} --log {log} {input.metrics}"
