"""The environment every report and benchmark JSON records: CPU, ISA flags, threads, OS and package versions."""

from importlib import metadata

import torch

from torchslim.core import cpu
from torchslim.report import environment


def test_isa_flags_keeps_the_vector_and_matrix_extensions(monkeypatch):
    flags = frozenset({"fpu", "sse4_2", "avx", "avx2", "avx512f", "avx512_vnni", "avx512bw", "avx_vnni", "amx_int8",
                       "amx_tile", "fma", "ht"})
    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    assert cpu.isa_flags() == ["amx_int8", "amx_tile", "avx2", "avx512_vnni", "avx512bw", "avx512f", "avx_vnni"]


def test_isa_flags_is_empty_without_a_flags_line(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset())
    assert cpu.isa_flags() == []


def test_environment_records_threads_isa_flags_and_installed_versions():
    env = environment(3)
    assert env["threads"] == 3
    assert env["torch"] == torch.__version__
    assert env["isa_flags"] == cpu.isa_flags()
    assert isinstance(env["os"], str) and env["os"]
    assert env["numpy"] == metadata.version("numpy")  # a dependency: always installed
    assert set(env["cpu_int8_features"]) <= set(env["isa_flags"])
