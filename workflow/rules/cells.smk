# One Slurm job per cell: srun starts one rank per GPU and one collector per node.


rule run_cell:
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
