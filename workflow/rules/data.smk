localrules:
    prepare_dataset,


rule prepare_dataset:
    """Download a dataset with its checksums (or check a manual one) and mark it READY."""
    output:
        ready=f"{DATA}/{{dataset}}/READY",
    params:
        root=lambda wildcards, output: os.path.dirname(output.ready),
        download="--download" if config["download"] else "--no-download",
    log:
        f"{RESULTS}/logs/prepare_dataset/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/prepare_dataset/{{dataset}}.tsv"
    container: CONTAINER
    shell:
        "python -m ncd prepare --dataset {wildcards.dataset} --root {params.root} "
        "{params.download} --log {log}"
