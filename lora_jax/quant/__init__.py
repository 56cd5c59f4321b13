"""Frozen weights held quantized: the formats (`nf4`, `int8`, GGUF blocks) and the kernel that
carries them through the params tree (`kernels`)."""
