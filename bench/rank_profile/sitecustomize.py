"""Profile one compiled decode inside a cell's rank, from outside the code (a bench diagnostic).

Session 16 found the dense compiled decode ~160 µs a step slower in a `run-group` rank than in
`bench/engines.py` (docs/precision.md). To see which kernels differ, run a group with this
folder first on PYTHONPATH and an output path in ``LLMENERGY_BENCH_PROFILE``:

    PYTHONPATH=$PWD/bench/rank_profile:$PWD/src LLMENERGY_BENCH_PROFILE=$OUT/rank_profile.json \\
        python -m llmenergy.cli run-group --config C --group G

Python imports ``sitecustomize`` at start-up in every process. In a rank (``RANK`` set) this
one wraps ``CompiledEngine.generate``: the first call that generates ``--gen``-sized batches
after the warm-up first runs ``bench/step_profile.py``'s :func:`profile_one` on the same
engine and prompts (20 decode steps, fewer in a shorter cell, under ``torch.profiler``, the prefill's kernels taken
out), writes the result to ``$LLMENERGY_BENCH_PROFILE`` (``.rank<N>`` added beyond rank 0),
then makes the real call. The extra generations run between the cell's measured windows,
so the cell itself is a diagnostic run, not a measurement. Compare the file with
``bench/step_profile.py --precision fp16 --batches 1`` run in the bench's own process.
Other processes (the launcher, the node agent, the collector) are left untouched.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

_OUT = os.environ.get("LLMENERGY_BENCH_PROFILE")
_MIN_GEN = 16  # the warm-up generates 8 tokens; measured batches generate the cell's max_gen_len
#: the environment variables recorded beside the profile (what could make cuBLAS choose otherwise)
_ENV_PREFIXES = ("TORCH", "CUDA", "CUBLAS", "NCCL", "OMP", "PYTORCH", "MKL", "TRITON", "LLMENERGY")


def _install(out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: step_profile, engines
    from llmenergy.inference import compiled

    plain = compiled.CompiledEngine.generate
    done: list[bool] = []

    def generate(self, prompts, max_gen_len, **kwargs):  # type: ignore[no-untyped-def]
        if not done and max_gen_len >= _MIN_GEN:
            done.append(True)
            import torch
            from engines import _weight_bytes
            from step_profile import profile_one

            steps = min(20, max_gen_len - 1)  # within the cell's KV cache
            row = profile_one(self, prompts, steps, _weight_bytes(self.model, self), self.device.type == "cuda")
            rank = int(os.environ.get("RANK", "0"))
            path = out if rank == 0 else out.with_name(f"{out.name}.rank{rank}")
            path.write_text(json.dumps({"where": "rank", "precision": self.precision,
                                        "quant_backend": self.quant_backend, "torch": torch.__version__,
                                        "env": {k: v for k, v in os.environ.items()
                                                if k.startswith(_ENV_PREFIXES) or k in ("RANK", "WORLD_SIZE")},
                                        "blas": str(torch.backends.cuda.preferred_blas_library()),
                                        "fp16_reduced_reduction":
                                            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
                                        "threads": torch.get_num_threads(),
                                        "runs": [row]}, indent=1))
        return plain(self, prompts, max_gen_len, **kwargs)

    compiled.CompiledEngine.generate = generate  # type: ignore[method-assign]


if _OUT and "RANK" in os.environ:
    _install(Path(_OUT))
