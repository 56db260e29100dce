"""FAKE GPU hardware for worker ranks (tests only): a thin shim over the ``fake_*`` modules here.

A process started with ``tests/fakes/rank`` on ``PYTHONPATH`` imports this file
at start-up (Python's ``sitecustomize`` hook). Each fake does nothing unless
its variable is set:

* ``FAKE_OOM_AT_BATCH``: :mod:`fake_oom`, CUDA out-of-memory at a batch;
* ``FAKE_RANK_GPU_UUID``: :mod:`fake_rank_gpu`, a CPU rank announces this GPU.
"""
import fake_oom
import fake_rank_gpu

fake_oom.install()
fake_rank_gpu.install()
