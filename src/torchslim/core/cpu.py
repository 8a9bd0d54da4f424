"""What this CPU can do (its /proc/cpuinfo flags): the integer and bfloat16 features that decide which int8 settings
are safe and which precision paths are fast."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


# The vector and matrix extensions that decide which kernels a runtime picks (latency tables are per set).
VECTOR_FEATURES = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                             "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd",
                             "sve", "sve2"})


def vector_features() -> list[str]:
    return sorted(cpu_flags() & VECTOR_FEATURES)


def has_vnni() -> bool:
    """AVX-512 VNNI, AVX-VNNI or AMX-INT8: u8*s8 dot products accumulate in 32 bits without saturating."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def int8_features() -> list[str]:
    return sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile"})
