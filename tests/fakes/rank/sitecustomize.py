"""FAKE hardware and faults for a cell's processes (tests only): a thin shim over the ``fake_*`` modules here.

A process started with ``tests/fakes/rank`` on ``PYTHONPATH`` imports this file
at start-up (Python's ``sitecustomize`` hook). Each fake does nothing unless
its variable is set:

* ``FAKE_OOM_AT_BATCH``: :mod:`fake_oom`, CUDA out-of-memory at a batch;
* ``FAKE_RANK_GPU_UUID``: :mod:`fake_rank_gpu`, a CPU rank announces this GPU;
* ``FAKE_CRASH_CELLS``: :mod:`fake_rank_crash`, the listed cells' ranks fail;
* ``FAKE_METRICS_CRASH``: :mod:`fake_metrics_crash`, the launcher's metrics step raises;
* ``FAKE_RANK_UNSET_ENV``: :mod:`fake_rank_env`, the ranks start without the listed variables;
* ``FAKE_SLOW_DECODE_BATCH``: :mod:`fake_slow_decode`, a measured batch's decode lasts longer;
* ``FAKE_DATA_PINS``: :mod:`fake_data_pins`, ``llmenergy data fetch`` verifies the test's files;
* ``TEST_STATUS_CHECK_MAX_S``: :mod:`status_poll`, Snakemake's Slurm status checks at most
  that many seconds apart (not a fake: a test's wait, see the module).
"""
import fake_data_pins
import fake_metrics_crash
import fake_oom
import fake_rank_crash
import fake_rank_env
import fake_rank_gpu
import fake_slow_decode
import status_poll

fake_oom.install()
fake_rank_gpu.install()
fake_rank_crash.install()
fake_rank_env.install()
fake_metrics_crash.install()
fake_data_pins.install()
fake_slow_decode.install()
status_poll.install()
