# One rule per stage of the stage table (ncd/stages.py), generated here: a stage's name is its
# rule, its `python -m ncd` sub-command and its output folder. Adding a stage adds its rule.


for _st in STAGES.values():
    _a = stage_rule_args(_st)

    rule:
        name:
            _st.name
        input:
            unpack(stage_inputs(_st.name, _st.name)),
        output:
            artifact=_a["output"],
            record=_a["record"],
        params:
            stage=_st.name,
            cfg=slice_json(_st.name),
            config_hash=slice_hash(_st.name),
            launch=_a["launch"],
            root=data_root,
            inputs=input_flags(_st.name),
        log:
            _a["log"],
        benchmark:
            _a["benchmark"]
        threads: threads_of
        resources:
            **_a["resources"],
        container: CONTAINER
        shell:
            STAGE_SHELL


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
