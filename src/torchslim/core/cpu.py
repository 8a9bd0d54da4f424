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


def has_vnni() -> bool:
    """AVX-512 VNNI, AVX-VNNI or AMX-INT8: u8*s8 dot products accumulate in 32 bits without saturating."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def int8_features() -> list[str]:
    return sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile"})


def isa_flags() -> list[str]:
    """The vector and matrix extensions that decide which kernels run (AVX2, every AVX-512 subset, AMX, VNNI; on
    ARM NEON/SVE), as /proc/cpuinfo names them; empty where it has no ``flags`` line (macOS). Reports record them;
    latency tables are kept per set."""
    arm = {"asimd", "sve", "sve2"}
    return sorted(f for f in cpu_flags()
                  if f == "avx2" or f.startswith(("avx512", "amx")) or "vnni" in f or f in arm)
