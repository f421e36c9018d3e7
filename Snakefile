# ncd: regenerate the results tables of SCAN, UNO, SeLa, CLD and the two-stage classifier.
#   snakemake --cores 2                                       # embedded default (config.yaml)
#   snakemake --profile slurm --configfile workflow/experiments/paper.yaml   # ./slurm = workflow/profiles/slurm
#   snakemake --report report.zip                              # Snakemake's report of a finished run
from snakemake.utils import min_version

min_version("9.20")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/handoff.smk"
include: "workflow/rules/cluster.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/stages.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        f"{REPORTS}/index.html",
        f"{REPORTS}/README.md",
