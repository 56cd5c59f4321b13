"""What compiling costs a run: JAX's compile events, summed while a `CompileClock` is open.

    with CompileClock() as clock:
        ...                                   # build, jit, run
    clock.seconds, clock.programs             # tracing + lowering + XLA, programs compiled

JAX reports each compilation's phases through `jax.monitoring` (tracing to a jaxpr, lowering to
MLIR, the backend's compile). A program served from the persistent compilation cache
(`compile_cache`) still reports a backend phase, of the time it took to read it, and a cache
hit: `programs` counts the compiles actually paid for, `cache_hits` the others.
"""

from __future__ import annotations

import time

import jax

TRACE = "/jax/core/compile/jaxpr_trace_duration"
LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
BACKEND = "/jax/core/compile/backend_compile_duration"
CACHE_HIT = "/jax/compilation_cache/cache_hits"


class CompileClock:
    """Seconds spent compiling (per phase and in all) and programs compiled while open."""

    def __init__(self):
        self.phases = {TRACE: 0.0, LOWER: 0.0, BACKEND: 0.0}
        self.backend_calls = 0
        self.cache_hits = 0
        self.opened = time.perf_counter()

    def _listen(self, event: str, seconds: float, **_) -> None:
        if event in self.phases:
            self.phases[event] += seconds
            self.backend_calls += event == BACKEND

    def _count(self, event: str, **_) -> None:
        self.cache_hits += event == CACHE_HIT

    @property
    def programs(self) -> int:
        """Programs compiled (not read from the persistent cache)."""
        return self.backend_calls - self.cache_hits

    @property
    def seconds(self) -> float:
        return sum(self.phases.values())

    def since_open(self) -> float:
        return time.perf_counter() - self.opened

    def __enter__(self) -> "CompileClock":
        self.opened = time.perf_counter()
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        jax.monitoring.register_event_listener(self._count)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)
        jax.monitoring.unregister_event_listener(self._count)

    def record(self) -> dict[str, float | int]:
        """The figures as a run-log record's fields."""
        return {"compile_s": round(self.seconds, 3), "xla_compile_s": round(self.phases[BACKEND], 3),
                "programs_compiled": self.programs, "cache_hits": self.cache_hits}
