"""Evaluation metrics in numpy: `glue` (accuracy, F1, Matthews, Pearson, Spearman)."""
