"""From a config to a trained run: setup (model, methods, mesh, steps), the optimizer, sharding,
checkpoints, the run's log and workdir, its inputs record, preemption and evaluation. The entry
point is `lora_jax.train`."""
