localrules:
    report,
    aggregate,


rule report:
    """Reported vs reproduced tables, confusion matrices, loss curves and provenance."""
    input:
        table=f"{RESULTS}/metrics.csv",
        reported="reports/reported.yaml",
        protocols="reports/protocols.yaml",
    output:
        # marked for `snakemake --report` (captions in workflow/report/)
        html=report(f"{REPORTS}/index.html", caption="../report/index.rst", category="Report"),
        readme=f"{REPORTS}/README.md",
        figures=report(directory(f"{REPORTS}/figures"), patterns=["{kind,confusion|loss}_{name}.png"],
                       caption="../report/figures.rst", category="Figures", subcategory="{kind}",
                       labels={"figure": "{kind}", "experiment and stage": "{name}"}),
        tables=report(directory(f"{REPORTS}/tables"), patterns=["{name}.csv"], caption="../report/tables.rst",
                      category="Tables"),
    params:
        experiments=lambda wc: shlex.quote(json.dumps({e: exp_cfg(e) for e in EXPERIMENTS}, sort_keys=True)),
        results=lambda wildcards, input: os.path.dirname(input.table),
        out=lambda wildcards, output: os.path.dirname(output.html),
    log:
        f"{RESULTS}/logs/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/all.tsv"
    container: CONTAINER
    shell:
        "python -m ncd report --metrics {input.table} --reported {input.reported} --protocols {input.protocols} --results {params.results} "
        "--benchmarks {params.results}/benchmarks --experiments {params.experiments} --out {params.out} --log {log}"
