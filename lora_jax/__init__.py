"""lora_jax: LoRA as a functional transform over JAX/Flax parameter pytrees.

    from lora_jax.training import optim
    from lora_jax.methods import lora
    frozen, trainable = lora.split(spec, params, key)
    apply = lora.adapt(model.apply, spec)
"""

from lora_jax.methods.lora import LoraSpec

__version__ = "0.1.0"
__all__ = ["LoraSpec", "__version__"]
