"""mpo_online pins the CPU float code path on x86-64 (mpo_online/__init__.py): importing it before the first tensor
op puts MKL, ATen and oneDNN on their AVX2 kernels, so machines with and without AVX-512 compute the same bits
(the bits themselves: tests/test_trainer.py::test_same_bits_as_recorded_on_the_development_machine)."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 pins only")

PROBE = ("import mpo_online, torch, json, os; "
         "print(json.dumps([torch.backends.cpu.get_cpu_capability(), mpo_online.pinned_cpu_env()]))")


def _probe(env: dict) -> list:
    clean = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True, timeout=120)
    import json
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_pins_avx2_kernels_in_a_fresh_process():
    capability, pins = _probe({})
    assert capability == "AVX2"
    assert pins == {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_an_explicit_setting_wins():
    capability, pins = _probe({"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"})
    assert capability == "DEFAULT"
    assert pins["MKL_CBWR"] == "COMPATIBLE" and pins["ONEDNN_MAX_CPU_ISA"] == "AVX2"


def test_ray_train_workers_get_the_pins():
    from mpo_online.trainer.launch import worker_runtime_env
    env = worker_runtime_env()["env_vars"]
    assert {k: env[k] for k in ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")} == {
        k: os.environ[k] for k in ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
