"""mpo_online pins the training processes' CPU float code path on x86-64 (mpo_online/__init__.py): MKL, ATen and
oneDNN on their AVX2 kernels, so machines of one CPU vendor with and without AVX-512 train to the same bits (the
bits themselves, per vendor: tests/test_trainer.py::test_same_bits_as_recorded_on_the_development_machine)."""

import os
import platform

import pytest

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 pins only")
KEYS = ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def test_ray_train_workers_get_the_pins(monkeypatch):
    from mpo_online.trainer.launch import worker_runtime_env
    for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(k, raising=False)
    env = worker_runtime_env()["env_vars"]
    assert {k: env[k] for k in KEYS} == {"MKL_CBWR": os.environ["MKL_CBWR"], "ATEN_CPU_CAPABILITY": "avx2",
                                         "ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_an_explicit_setting_wins(monkeypatch):
    from mpo_online import pinned_cpu_env
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert pinned_cpu_env()["ATEN_CPU_CAPABILITY"] == "default"
