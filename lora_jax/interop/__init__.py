"""Files shared with the Hugging Face world: checkpoints in (hub.py), PEFT adapters out and in
(peft_adapters.py), and trained methods on disk in PEFT's format or lora_jax's (exports.py)."""
