"""What compiling costs a run: JAX's compile events, summed while a `CompileClock` is open.

    with CompileClock() as clock:
        ...                                   # build, jit, run
    clock.seconds, clock.programs             # tracing + lowering + XLA, programs compiled

JAX reports each compilation's phases through `jax.monitoring` (tracing to a jaxpr, lowering to
MLIR, the backend's compile); a program served from the persistent compilation cache reports no
backend compile, so `programs` counts the compiles actually paid for.
"""

from __future__ import annotations

import time

import jax

TRACE = "/jax/core/compile/jaxpr_trace_duration"
LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
BACKEND = "/jax/core/compile/backend_compile_duration"


class CompileClock:
    """Seconds spent compiling (per phase and in all) and programs compiled while open."""

    def __init__(self):
        self.phases = {TRACE: 0.0, LOWER: 0.0, BACKEND: 0.0}
        self.programs = 0
        self.opened = time.perf_counter()

    def _listen(self, event: str, seconds: float, **_) -> None:
        if event in self.phases:
            self.phases[event] += seconds
            self.programs += event == BACKEND

    @property
    def seconds(self) -> float:
        return sum(self.phases.values())

    def since_open(self) -> float:
        return time.perf_counter() - self.opened

    def __enter__(self) -> "CompileClock":
        self.opened = time.perf_counter()
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)

    def record(self) -> dict[str, float | int]:
        """The figures as a run-log record's fields."""
        return {"compile_s": round(self.seconds, 3), "xla_compile_s": round(self.phases[BACKEND], 3),
                "programs_compiled": self.programs}
