# llmenergy: the energy cost of LLM inference, one Slurm job per matrix cell.
#   snakemake --profile profiles/slurm -n     # the plan
#   snakemake --profile profiles/slurm        # run it (reruns only missing/failed cells)
#   snakemake --profile profiles/local        # the built-in demo on one machine
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/cells.smk"
include: "workflow/rules/analysis.smk"


rule all:
    input:
        REPORT,
