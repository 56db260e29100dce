# llmenergy: the energy cost of LLM inference. One Slurm job per group of cells sharing a model
# load (cut into parts that fit the partition's time limit), or per cell with `packing: cell`.
#   snakemake --profile profiles/slurm -n     # the plan
#   snakemake --profile profiles/slurm        # run it (reruns only missing/failed cells)
#   snakemake --profile profiles/local        # the built-in demo on one machine
from snakemake.utils import min_version

min_version("9.0")


# The repository's matrix, unless a config file is given (--configfile, or a profile's
# configfile: as profiles/local's demo): Snakemake would merge this one under it key by key,
# so keys left out of yours would come from here rather than from the defaults.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/cells.smk"
include: "workflow/rules/analysis.smk"


rule all:
    input:
        REPORT,


# A failed cell (or any failed job) still leaves a report of whatever finished, naming
# the cells not measured; Snakemake then exits non-zero. Rerun the same command to
# run only what is missing.
onerror:
    if workflow.is_main_process:
        try:
            CTX.partial_report(REPORT)
        except Exception as exc:  # the run already failed: say why there is no report
            logger.error(f"llmenergy: no partial report ({type(exc).__name__}: {exc})")
