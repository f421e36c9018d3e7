rule pretrain:
    """Pretext training (SimCLR) or MoCo import -> the backbone every later stage starts from."""
    input:
        unpack(artifact_inputs("pretrain", f"{RUN}/pretrain")),
    output:
        model=f"{RUN}/pretrain/model.ckpt",
        record=record_of("pretrain", f"{RUN}/pretrain"),
    params:
        cfg=exp_json,
        config_hash=config_hash_of,
        launch=launcher,
        root=data_root,
    log:
        f"{RESULTS}/logs/pretrain/{{exp}}_seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pretrain/{{exp}}_seed{{seed}}.tsv"
    threads: threads_of
    resources:
        **train_resources(),
    container: CONTAINER
    shell:
        (
            "{params.launch}python -m ncd pretrain --experiment {wildcards.exp} --seed {wildcards.seed} "
            "--config {params.cfg} --data-root {params.root} --out {output.model} --log {log} --threads {threads}"
            + RECORD
        )


rule mine_neighbors:
    """Nearest neighbours on the pretext features (faiss, exact inner product)."""
    input:
        unpack(artifact_inputs("mine_neighbors", f"{RUN}/pretrain", model=f"{RUN}/pretrain/model.ckpt")),
    output:
        neighbors=f"{RUN}/pretrain/neighbors.npz",
        record=record_of("mine_neighbors", f"{RUN}/pretrain"),
    params:
        cfg=exp_json,
        config_hash=config_hash_of,
        root=data_root,
    log:
        f"{RESULTS}/logs/mine_neighbors/{{exp}}_seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/mine_neighbors/{{exp}}_seed{{seed}}.tsv"
    threads: threads_of
    resources:
        **train_resources(multi_gpu=False),
    container: CONTAINER
    shell:
        (
            "python -m ncd mine --experiment {wildcards.exp} --seed {wildcards.seed} --config {params.cfg} "
            "--data-root {params.root} --pretrain {input.model} --out {output.neighbors} --log {log} --threads {threads}"
            + RECORD
        )
