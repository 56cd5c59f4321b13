"""Files shared with the Hugging Face world, whatever the method: checkpoints in (hub.py) and PEFT
adapter directories (peft_adapters.py). Each method maps itself onto them in its own file under
lora_jax/methods; lora_jax/exports.py saves and reads a trained stack through that mapping."""
