# packing: cell: one Slurm job per cell. srun starts one rank per GPU and one collector per node.


rule run_cell:
    input:
        CTX.would_rerun_input("cell"),  # a dry run's mark of a cell it would rerun (smk.WOULD_RERUN_DIR)
    output:
        metrics=f"{OUT}/cells/{{cell}}/metrics.parquet",
        cell_json=f"{OUT}/cells/{{cell}}/cell.json",
    log:
        f"{OUT}/logs/run_cell/{{cell}}.log",
    params:
        config=CTX.config_arg,
        llmenergy=LLMENERGY,
    resources:
        **CTX.rule_resources(),
    conda:
        "../../envs/llmenergy.yaml"
    shell:
        "{params.llmenergy} run-cell --config {params.config:q} --cell {wildcards.cell:q} > {log:q} 2>&1"


# packing: group (the default): one Slurm job per group of cells sharing model, GPU type, shards,
# engine and power cap, or per part of a group too long for its partition (the wildcard is then
# the part's id, {group}.cells{first}-{last}); the ranks load the model once and run the job's
# unfinished cells in order. The output is the job's done marker: the cells' own files are not declared outputs, so a
# failed cell never takes its finished neighbours with it (the job then exits non-zero).
rule run_group:
    input:
        CTX.would_rerun_input("group"),
    output:
        f"{OUT}/groups/{{group}}/done.json",
    log:
        f"{OUT}/logs/run_group/{{group}}.log",
    params:
        config=CTX.config_arg,
        llmenergy=LLMENERGY,
    resources:
        **CTX.rule_group_resources(),
    conda:
        "../../envs/llmenergy.yaml"
    shell:
        "{params.llmenergy} run-group --config {params.config:q} --group {wildcards.group:q} > {log:q} 2>&1"
