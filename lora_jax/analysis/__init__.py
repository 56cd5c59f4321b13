"""Section 7 of the LoRA paper: what the learned adapters look like.

  subspace.py       phi(A1, A2, i, j), the normalized subspace similarity of two adapters.
  amplification.py  how dW relates to the frozen W it adapts (Table 7).
  compare.py        `python -m lora_jax.analysis.compare RUN_1 RUN_2 --out DIR`: both, on two runs.
"""

from lora_jax.analysis.amplification import amplification, projection_norm, top_singular_vectors
from lora_jax.analysis.subspace import (random_gaussian_like, similarity_grid, singular_directions,
                                        subspace_similarity)

__all__ = [
    "amplification",
    "projection_norm",
    "random_gaussian_like",
    "similarity_grid",
    "singular_directions",
    "subspace_similarity",
    "top_singular_vectors",
]
