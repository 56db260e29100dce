# Validate the config and build the matrix; all logic lives in llmenergy.
from snakemake.utils import validate

from llmenergy import smk

CTX = smk.load(config, workflow.configfiles)
validate(config, schema="../schemas/config.schema.json")

OUT = CTX.output_dir
CELLS = CTX.cell_ids
REPORT = f"{OUT}/report.html"


wildcard_constraints:
    cell=r"[A-Za-z0-9._-]+",
