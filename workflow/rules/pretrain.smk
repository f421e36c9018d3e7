rule pretrain:
    """Pretext training (SimCLR) or MoCo import -> the backbone every later stage starts from."""
    input:
        ready=ready_marker,
    output:
        model=f"{RUN}/pretrain/model.ckpt",
    params:
        cfg=exp_json,
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
        "{params.launch}python -m ncd pretrain --experiment {wildcards.exp} --seed {wildcards.seed} "
        "--config {params.cfg} --data-root {params.root} --out {output.model} --log {log} --threads {threads}"


rule mine_neighbors:
    """Nearest neighbours on the pretext features (faiss, exact inner product)."""
    input:
        ready=ready_marker,
        model=f"{RUN}/pretrain/model.ckpt",
    output:
        neighbors=f"{RUN}/pretrain/neighbors.npz",
    params:
        cfg=exp_json,
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
        "python -m ncd mine --experiment {wildcards.exp} --seed {wildcards.seed} --config {params.cfg} "
        "--data-root {params.root} --pretrain {input.model} --out {output.neighbors} --log {log} --threads {threads}"
