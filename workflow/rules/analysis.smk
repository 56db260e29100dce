# Summary table, figures and the HTML report, computed from the cells' outputs.


rule aggregate:
    input:
        CTX.targets(),
    output:
        summary=f"{OUT}/summary.parquet",
        stats=f"{OUT}/summary_stats.parquet",
    log:
        f"{OUT}/logs/aggregate.log",
    params:
        config=CTX.config_arg,
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    shell:
        "{LLMENERGY} aggregate --config {params.config:q} --results {OUT:q} > {log:q} 2>&1"


rule plot:
    input:
        rules.aggregate.output.summary,
    output:
        directory(f"{OUT}/figures"),
    log:
        f"{OUT}/logs/plot.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    shell:
        "{LLMENERGY} plot --summary {input:q} --out {output:q} > {log:q} 2>&1"


rule report:
    input:
        summary=rules.aggregate.output.summary,
        figures=rules.plot.output,
    output:
        REPORT,
    log:
        f"{OUT}/logs/report.log",
    params:
        config=CTX.config_arg,
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    shell:
        "{LLMENERGY} report --config {params.config:q} --results {OUT:q} --out {output:q} > {log:q} 2>&1"
