"""Where a run's numbers were computed: the software and the machine.

    environment.describe()   # {'jax': '0.10.2', ..., 'devices': '1 x cpu', 'cpu': 'AMD EPYC ...'}

A run is deterministic on one machine and software stack, not across them: XLA compiles for the
host's instruction set (AVX2 or AVX-512 sum in other orders), so a rerun elsewhere can differ in
its last bits from the first steps on, and a dev metric that counts examples can move by one.
Each start of a run records where it ran (a line in metrics.jsonl), and a sweep's record keeps
it, so a rerun that does not reproduce a record can tell another machine from another program.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import platform
from typing import Any

import jax

PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")
# The instruction-set extensions that change what XLA:CPU compiles (vector width, fused
# multiply-add, bf16 / int8 dot instructions).
CPU_FEATURES = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
                "avx512_vnni", "amx_bf16", "amx_tile", "asimd", "sve")


def describe() -> dict[str, Any]:
    """The software versions, devices, CPU and XLA flags of this process, as flat JSON values."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    devices = jax.devices()
    return {"python": platform.python_version(), **versions,
            "devices": f"{len(devices)} x {devices[0].device_kind}", **_cpu(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _cpu() -> dict[str, str]:
    """The CPU's model and the features of CPU_FEATURES it has (Linux: /proc/cpuinfo)."""
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    fields = {}
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() not in fields:  # the first processor's
                fields[key.strip()] = value.strip()
    model = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields:  # the model name alone can hide the generation ("AMD EPYC")
        model += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {"cpu": model, "cpu_features": " ".join(f for f in CPU_FEATURES if f in flags)}


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'field: recorded != current' for each field in which two environments differ."""
    return [f"{k}: {recorded.get(k)!r} != {current.get(k)!r}"
            for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]
