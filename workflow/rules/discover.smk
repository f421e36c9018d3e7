rule scan:
    """SCAN clustering on the mined neighbours; keeps the head with the lowest validation loss."""
    input:
        ready=ready_marker,
        pretrain=f"{RUN}/pretrain/model.ckpt",
        neighbors=f"{RUN}/pretrain/neighbors.npz",
    output:
        model=f"{RUN}/scan/model.ckpt",
    params:
        cfg=exp_json,
        launch=launcher,
        root=data_root,
    log:
        f"{RESULTS}/logs/scan/{{exp}}_seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/scan/{{exp}}_seed{{seed}}.tsv"
    threads: threads_of
    resources:
        **train_resources(),
    container: CONTAINER
    shell:
        "{params.launch}python -m ncd scan --experiment {wildcards.exp} --seed {wildcards.seed} --config {params.cfg} "
        "--data-root {params.root} --pretrain {input.pretrain} --neighbors {input.neighbors} "
        "--out {output.model} --log {log} --threads {threads}"


rule selflabel:
    """Self-labeling from the selected SCAN head."""
    input:
        ready=ready_marker,
        scan=f"{RUN}/scan/model.ckpt",
    output:
        model=f"{RUN}/selflabel/model.ckpt",
    params:
        cfg=exp_json,
        launch=launcher,
        root=data_root,
    log:
        f"{RESULTS}/logs/selflabel/{{exp}}_seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/selflabel/{{exp}}_seed{{seed}}.tsv"
    threads: threads_of
    resources:
        **train_resources(),
    container: CONTAINER
    shell:
        "{params.launch}python -m ncd selflabel --experiment {wildcards.exp} --seed {wildcards.seed} --config {params.cfg} "
        "--data-root {params.root} --scan {input.scan} --out {output.model} --log {log} --threads {threads}"


rule kmeans:
    """The baseline: k-means on raw pixels."""
    input:
        ready=ready_marker,
    output:
        model=f"{RUN}/cluster/model.ckpt",
    params:
        cfg=exp_json,
        root=data_root,
    log:
        f"{RESULTS}/logs/kmeans/{{exp}}_seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/kmeans/{{exp}}_seed{{seed}}.tsv"
    threads: threads_of
    resources:
        **train_resources(gpu=False),
    container: CONTAINER
    shell:
        "python -m ncd kmeans --experiment {wildcards.exp} --seed {wildcards.seed} --config {params.cfg} "
        "--data-root {params.root} --out {output.model} --log {log} --threads {threads}"


rule pretrain_supervised:
    """UNO stage 1: supervised pretraining on the known classes."""
    input:
        ready=ready_marker,
    output:
        model=f"{RUN}/pretrain_supervised/model.ckpt",
    params:
        cfg=exp_json,
        launch=launcher,
        root=data_root,
    log:
        f"{RESULTS}/logs/pretrain_supervised/{{exp}}_seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pretrain_supervised/{{exp}}_seed{{seed}}.tsv"
    threads: threads_of
    resources:
        **train_resources(),
    container: CONTAINER
    shell:
        "{params.launch}python -m ncd pretrain-supervised --experiment {wildcards.exp} --seed {wildcards.seed} "
        "--config {params.cfg} --data-root {params.root} --out {output.model} --log {log} --threads {threads}"


rule discover:
    """UNO stage 2: novel class discovery with the unified objective."""
    input:
        ready=ready_marker,
        pretrain=f"{RUN}/pretrain_supervised/model.ckpt",
    output:
        model=f"{RUN}/discover/model.ckpt",
    params:
        cfg=exp_json,
        launch=launcher,
        root=data_root,
    log:
        f"{RESULTS}/logs/discover/{{exp}}_seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/discover/{{exp}}_seed{{seed}}.tsv"
    threads: threads_of
    resources:
        **train_resources(),
    container: CONTAINER
    shell:
        "{params.launch}python -m ncd discover --experiment {wildcards.exp} --seed {wildcards.seed} --config {params.cfg} "
        "--data-root {params.root} --pretrain {input.pretrain} --out {output.model} --log {log} --threads {threads}"
