# Validate the config (llmenergy.config: JSON schema, then semantic checks) and build the
# matrix; all logic lives in llmenergy.
import os
import sys

from llmenergy.orchestrate import smk
from llmenergy.errors import UserError

try:
    CTX = smk.load(config, workflow.configfiles)
except UserError as exc:  # one line naming the file and key, before anything is submitted
    sys.stderr.write(f"llmenergy: error: {exc}\n")
    sys.exit(exc.exit_code)

OUT = CTX.output_dir
# The package from this checkout, by whichever `python` the environment has (a venv,
# or the conda env of `--sdm conda`, which holds the dependencies but not llmenergy).
LLMENERGY = (
    f'PYTHONPATH="{workflow.basedir}/src${{PYTHONPATH:+:$PYTHONPATH}}" python -m llmenergy.cli'
)
CELLS = CTX.cell_ids
REPORT = f"{OUT}/report.html"


wildcard_constraints:
    cell=r"[A-Za-z0-9._-]+",
    group=r"[A-Za-z0-9._-]+",


# Before anything runs (main process only): corrupt or unfinished cell outputs are moved
# aside (*.rejected), and so are those of finished cells whose fingerprint no longer
# matches the config, or whose status changed under newer metrics rules (aggregate's
# status_changed) (cells/<id>/superseded/<fingerprint>/), so that exactly those cells rerun;
# under policies.on_config_change: error, one error lists the changed configs instead.
# (workflow.dryrun is not yet set while the Snakefile is parsed: read -n from the command line.)
_DRY_RUN = workflow.dryrun or smk.dry_run_requested(sys.argv)
if workflow.is_main_process:
    _derived = [f"{OUT}/summary.parquet", f"{OUT}/summary_stats.parquet", REPORT]
    try:
        _rerun = CTX.prepare(dry_run=_DRY_RUN, derived=_derived)
    except UserError as exc:
        sys.stderr.write(f"llmenergy: error: {exc}\n")
        sys.exit(exc.exit_code)
    for _cell in _rerun:
        _what = "would be set aside (dry run)" if _DRY_RUN else "set aside"
        logger.warning(f"llmenergy: {_cell}: outputs {_what} (see above); the cell will be rerun")

if workflow.is_main_process and _DRY_RUN:  # e.g. "results: 9 of 11 finished in results/; to run 2 (...)"
    logger.info(f"llmenergy: {CTX.progress_line()}")

if workflow.is_main_process and CTX.switches_note:
    logger.warning(f"llmenergy: engine switches: {CTX.switches_note}")

if workflow.is_main_process and CTX.packing == "group":
    logger.info(f"llmenergy: packing: group: {len(CTX.cell_ids)} cells in {len(CTX.job_ids)} Slurm jobs "
                f"(one model load each; a group too long for its partition runs as parts)")
    if _DRY_RUN:
        for _line in CTX.group_lines():
            logger.info(f"llmenergy:   {_line}")

if CTX.plan.infeasible:
    logger.info(
        f"llmenergy: {len(CTX.cell_ids)} cells planned, {len(CTX.plan.infeasible)} left out "
        f"(see `llmenergy plan --config {CTX.cfg.source}` for each reason)"
    )
