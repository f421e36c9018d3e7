import sys

from ncd.errors import NcdError
from ncd.utils import dataset_marker


localrules:
    prepare_dataset,
    prepare_folder,


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


# --- A dataset in a folder of its own (data_path:, e.g. dataset: imagefolder) ------------------
# The user's folder is only read: its READY marker lives under data_dir/folders/, keyed by the dataset,
# the folder's name and a hash of its absolute path (ncd.utils.dataset_marker). For imagefolder,
# preparing decodes every image (naming a bad one); what each experiment needs of the folder (labels,
# enough images for its batches and neighbours) is checked here, when the workflow is parsed.

# marker folder name -> (dataset, absolute folder) of every selected experiment with a data_path
CUSTOM_DATA = {
    os.path.basename(os.path.dirname(dataset_marker(DATA, cfg["dataset"], cfg["data_path"]))): (
        cfg["dataset"],
        os.path.abspath(cfg["data_path"]),
    )
    for cfg in EXPERIMENTS.values()
    if cfg.get("data_path")
}

if any(cfg["dataset"] == "imagefolder" for cfg in EXPERIMENTS.values()):
    from ncd.data.folder import check_experiments  # imports torch: only for imagefolder experiments

    try:
        check_experiments(EXPERIMENTS)
    except NcdError as e:
        # as common.smk's validation: one line and status 2, not a traceback of this file
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


rule prepare_folder:
    """Check a dataset in the experiment's own folder (data_path) and mark it READY under data_dir."""
    output:
        ready=f"{DATA}/folders/{{folder}}/READY",
    wildcard_constraints:
        folder="[A-Za-z0-9_.+-]+",
    params:
        dataset=lambda wildcards: CUSTOM_DATA[wildcards.folder][0],
        root=lambda wildcards: shlex.quote(CUSTOM_DATA[wildcards.folder][1]),
        download="--download" if config["download"] else "--no-download",
    log:
        f"{RESULTS}/logs/prepare_folder/{{folder}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/prepare_folder/{{folder}}.tsv"
    container: CONTAINER
    shell:
        "python -m ncd prepare --dataset {params.dataset} --root {params.root} --marker {output.ready} "
        "{params.download} --log {log}"
