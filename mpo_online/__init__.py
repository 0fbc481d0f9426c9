"""mpo-online: online Mixed Preference Optimization for (multimodal) LLMs on Ray.

Components (import the one you need; this package import stays light and pulls in no torch, ray or vllm):
config, records, tasks, data, verify, losses, trainer, pairs, rollout_pipeline, serve_client, weight_sync,
evaluate, run_state, report, warm_start, tiny_model. The recipe that wires them is jobs/online_mpo.py.
"""

__version__ = "0.1.0"

import os as _os

# Intel MKL picks its float kernels by CPU (AVX-512 on Intel, AVX2 on AMD), so the same training run can round
# differently on two machines of the same kind, and a 500-step warm start of the tiny policy is sensitive to that
# (README, "Reproducibility across machines of one kind"). One code path for every x86-64 machine with AVX2: MKL
# reads this at its first call, so setting it here (before any matmul of a process that imports mpo_online) is
# enough. An explicit setting wins.
_os.environ.setdefault("MKL_CBWR", "AVX2")
