"""Sweeps over LoRA settings (rank, adapted matrices, seeds) and their reports."""
