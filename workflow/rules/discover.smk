rule scan:
    """SCAN clustering on the mined neighbours; keeps the head with the lowest validation loss."""
    input:
        unpack(artifact_inputs("scan", f"{RUN}/scan", pretrain=f"{RUN}/pretrain/model.ckpt", neighbors=f"{RUN}/pretrain/neighbors.npz")),
    output:
        model=f"{RUN}/scan/model.ckpt",
        record=record_of("scan", f"{RUN}/scan"),
    params:
        cfg=exp_json,
        config_hash=config_hash_of,
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
        (
            "{params.launch}python -m ncd scan --experiment {wildcards.exp} --seed {wildcards.seed} --config {params.cfg} "
            "--data-root {params.root} --pretrain {input.pretrain} --neighbors {input.neighbors} "
            "--out {output.model} --log {log} --threads {threads}"
            + RECORD
        )


rule selflabel:
    """Self-labeling from the selected SCAN head."""
    input:
        unpack(artifact_inputs("selflabel", f"{RUN}/selflabel", scan=f"{RUN}/scan/model.ckpt")),
    output:
        model=f"{RUN}/selflabel/model.ckpt",
        record=record_of("selflabel", f"{RUN}/selflabel"),
    params:
        cfg=exp_json,
        config_hash=config_hash_of,
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
        (
            "{params.launch}python -m ncd selflabel --experiment {wildcards.exp} --seed {wildcards.seed} --config {params.cfg} "
            "--data-root {params.root} --scan {input.scan} --out {output.model} --log {log} --threads {threads}"
            + RECORD
        )


rule kmeans:
    """The baseline: k-means on raw pixels."""
    input:
        unpack(artifact_inputs("kmeans", f"{RUN}/cluster")),
    output:
        model=f"{RUN}/cluster/model.ckpt",
        record=record_of("kmeans", f"{RUN}/cluster"),
    params:
        cfg=exp_json,
        config_hash=config_hash_of,
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
        (
            "python -m ncd kmeans --experiment {wildcards.exp} --seed {wildcards.seed} --config {params.cfg} "
            "--data-root {params.root} --out {output.model} --log {log} --threads {threads}"
            + RECORD
        )


rule pretrain_supervised:
    """UNO stage 1: supervised pretraining on the known classes."""
    input:
        unpack(artifact_inputs("pretrain_supervised", f"{RUN}/pretrain_supervised")),
    output:
        model=f"{RUN}/pretrain_supervised/model.ckpt",
        record=record_of("pretrain_supervised", f"{RUN}/pretrain_supervised"),
    params:
        cfg=exp_json,
        config_hash=config_hash_of,
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
        (
            "{params.launch}python -m ncd pretrain-supervised --experiment {wildcards.exp} --seed {wildcards.seed} "
            "--config {params.cfg} --data-root {params.root} --out {output.model} --log {log} --threads {threads}"
            + RECORD
        )


rule discover:
    """UNO stage 2: novel class discovery with the unified objective."""
    input:
        unpack(artifact_inputs("discover", f"{RUN}/discover", pretrain=f"{RUN}/pretrain_supervised/model.ckpt")),
    output:
        model=f"{RUN}/discover/model.ckpt",
        record=record_of("discover", f"{RUN}/discover"),
    params:
        cfg=exp_json,
        config_hash=config_hash_of,
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
        (
            "{params.launch}python -m ncd discover --experiment {wildcards.exp} --seed {wildcards.seed} --config {params.cfg} "
            "--data-root {params.root} --pretrain {input.pretrain} --out {output.model} --log {log} --threads {threads}"
            + RECORD
        )


rule cld:
    """CLD: an instance-discrimination learner (NPID, MoCo, MoCo v2, InfoMin) + the cross-level group branch."""
    input:
        unpack(artifact_inputs("cld", f"{RUN}/cld")),
    output:
        model=f"{RUN}/cld/model.ckpt",
        record=record_of("cld", f"{RUN}/cld"),
    params:
        cfg=exp_json,
        config_hash=config_hash_of,
        launch=launcher,
        root=data_root,
    log:
        f"{RESULTS}/logs/cld/{{exp}}_seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/cld/{{exp}}_seed{{seed}}.tsv"
    threads: threads_of
    resources:
        **train_resources(),
    container: CONTAINER
    shell:
        (
            "{params.launch}python -m ncd cld --experiment {wildcards.exp} --seed {wildcards.seed} --config {params.cfg} "
            "--data-root {params.root} --out {output.model} --log {log} --threads {threads}"
            + RECORD
        )


rule sela:
    """SeLa: self-labelling by optimal transport, multi-head (Sinkhorn-Knopp label steps between CE epochs)."""
    input:
        unpack(artifact_inputs("sela", f"{RUN}/sela")),
    output:
        model=f"{RUN}/sela/model.ckpt",
        record=record_of("sela", f"{RUN}/sela"),
    params:
        cfg=exp_json,
        config_hash=config_hash_of,
        launch=launcher,
        root=data_root,
    log:
        f"{RESULTS}/logs/sela/{{exp}}_seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/sela/{{exp}}_seed{{seed}}.tsv"
    threads: threads_of
    resources:
        **train_resources(),
    container: CONTAINER
    shell:
        (
            "{params.launch}python -m ncd sela --experiment {wildcards.exp} --seed {wildcards.seed} --config {params.cfg} "
            "--data-root {params.root} --out {output.model} --log {log} --threads {threads}"
            + RECORD
        )


rule superand:
    """Two-stage classifier, stage 1: Super-AND embedding (memory bank, anchor neighbourhoods over five rounds)."""
    input:
        unpack(artifact_inputs("superand", f"{RUN}/superand")),
    output:
        model=f"{RUN}/superand/model.ckpt",
        record=record_of("superand", f"{RUN}/superand"),
    params:
        cfg=exp_json,
        config_hash=config_hash_of,
        launch=launcher,
        root=data_root,
    log:
        f"{RESULTS}/logs/superand/{{exp}}_seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/superand/{{exp}}_seed{{seed}}.tsv"
    threads: threads_of
    resources:
        **train_resources(),
    container: CONTAINER
    shell:
        (
            "{params.launch}python -m ncd superand --experiment {wildcards.exp} --seed {wildcards.seed} --config {params.cfg} "
            "--data-root {params.root} --out {output.model} --log {log} --threads {threads}"
            + RECORD
        )


rule twostage:
    """Two-stage classifier, stage 2: fixed normalised heads (IIC) + consistency-preserving loss on the encoder.
    It starts from the stage-1 checkpoint, except with twostage.init: scratch (the ablation)."""
    input:
        unpack(
            lambda wildcards: artifact_inputs(
                "twostage",
                f"{RUN}/twostage",
                **({} if exp_cfg(wildcards.exp)["twostage"]["init"] == "scratch" else {"embed": f"{RUN}/superand/model.ckpt"}),
            )(wildcards)
        ),
    output:
        model=f"{RUN}/twostage/model.ckpt",
        record=record_of("twostage", f"{RUN}/twostage"),
    params:
        cfg=exp_json,
        config_hash=config_hash_of,
        launch=launcher,
        root=data_root,
        embed=lambda wildcards, input: f"--embed {input.embed}" if "embed" in input.keys() else "",
    log:
        f"{RESULTS}/logs/twostage/{{exp}}_seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/twostage/{{exp}}_seed{{seed}}.tsv"
    threads: threads_of
    resources:
        **train_resources(),
    container: CONTAINER
    shell:
        (
            "{params.launch}python -m ncd twostage --experiment {wildcards.exp} --seed {wildcards.seed} --config {params.cfg} "
            "--data-root {params.root} {params.embed} --out {output.model} --log {log} --threads {threads}"
            + RECORD
        )


rule twostage_ablation:
    """Optional target, not part of `all`: the supplement's "stage 2 without stage 1" runs (the stage-2 metrics
    of every configured experiment with twostage.init: scratch, selected or not)."""
    input:
        [
            f"{RESULTS}/{exp}/seed{seed}/twostage/metrics.json"
            for exp, cfg in config["experiments"].items()
            if cfg["method"] == "twostage" and cfg["twostage"]["init"] == "scratch"
            for seed in seeds_of(exp)
        ],
