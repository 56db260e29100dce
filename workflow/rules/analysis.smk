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
        llmenergy=LLMENERGY,
        results=lambda wildcards, output: os.path.dirname(output[0]),
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    shell:
        "{params.llmenergy} aggregate --config {params.config:q} --results {params.results:q} > {log:q} 2>&1"


rule plot:
    input:
        rules.aggregate.output.summary,
    output:
        report(directory(f"{OUT}/figures"), patterns=["{name}.png"], caption="../report/figure.rst",
               category="Figures"),
    log:
        f"{OUT}/logs/plot.log",
    params:
        llmenergy=LLMENERGY,
    threads: 8  # figures drawn at once (Snakemake lowers it to the cores it may use)
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    shell:
        "{params.llmenergy} plot --summary {input:q} --out {output:q} --jobs {threads} > {log:q} 2>&1"


rule report:
    input:
        summary=rules.aggregate.output.summary,
        figures=rules.plot.output,
    output:
        report(REPORT, caption="../report/report.rst", category="Report"),
    log:
        f"{OUT}/logs/report.log",
    params:
        config=CTX.config_arg,
        llmenergy=LLMENERGY,
        results=lambda wildcards, output: os.path.dirname(output[0]),
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    shell:
        "{params.llmenergy} report --config {params.config:q} --results {params.results:q} --out {output:q} > {log:q} 2>&1"
