"""lora_jax.merging on task tensors with answers worked by hand (PEFT parity on whole adapters:
tests/test_adapter_set.py)."""

import jax
import numpy as np
import pytest

from lora_jax import merging

T1 = np.array([1.0, -2.0, 3.0, 0.1])
T2 = np.array([-1.0, -1.0, 2.0, 0.2])


def test_ties_trims_elects_signs_and_averages_the_agreeing():
    # density 0.75 keeps 3 of 4: each drops its smallest |entry|. Signs elected from the sums
    # [0, -3, 5, 0] are +, -, +, + (ties go to +); entries of another sign (or 0) are left out
    # of each mean.
    np.testing.assert_allclose(merging.ties([T1, T2], [1.0, 1.0], density=0.75),
                               [1.0, -1.5, 2.5, 0.0])
    # Weights scale the entries after the election: the mean of 2 * (-2) and 1 * (-1).
    np.testing.assert_allclose(merging.ties([T1, T2], [2.0, 1.0], density=0.75),
                               [2.0, -2.5, 4.0, 0.0])


def test_ties_frequency_elects_the_sign_most_tensors_have():
    t3 = np.array([-0.5, 4.0, 1.0, 1.0])
    # Entry 0: signs +, -, - (sum of values 1 - 1 - 0.5 < 0 too); entry 1: -, -, + (total
    # -2 - 1 + 4 = 1 >= 0 elects +, frequency elects -).
    total = merging.ties([T1, T2, t3], [1.0, 1.0, 1.0], density=1.0)
    frequency = merging.ties([T1, T2, t3], [1.0, 1.0, 1.0], density=1.0,
                             majority_sign_method="frequency")
    assert total[1] == 4.0 and frequency[1] == -1.5
    np.testing.assert_allclose(total[0], -0.75)


def test_magnitude_prune_keeps_the_largest_entries_then_sums():
    t3 = np.array([-1.0, -1.5, 2.0, 0.2])
    np.testing.assert_allclose(merging.magnitude_prune([T1, t3], [1.0, 0.5], density=0.5),
                               [0.0, -2.75, 4.0, 0.0])  # T1 keeps -2, 3; t3 keeps -1.5, 2
    assert merging.prune_by_magnitude(T1, 0.0).tolist() == [0.0, 0.0, 0.0, 0.0]
    assert merging.prune_by_magnitude(T1, 1.5) is T1


def test_dare_drops_at_random_and_rescales_what_it_keeps():
    key = jax.random.key(0)
    tensor = np.ones((200, 50))
    dropped = merging.prune_at_random(tensor, 0.3, key)
    kept = dropped != 0
    assert set(np.unique(dropped)) == {0.0, 1.0 / 0.3}
    assert abs(kept.mean() - 0.3) < 0.02  # 10,000 Bernoulli(0.3) draws
    # dare_linear: each tensor its own draw (fold_in of its index), then the weighted sum.
    merged = merging.dare_linear([tensor, 2 * tensor], [1.0, 1.0], 0.3, key)
    first = merging.prune_at_random(tensor, 0.3, jax.random.fold_in(key, 0))
    second = merging.prune_at_random(2 * tensor, 0.3, jax.random.fold_in(key, 1))
    np.testing.assert_allclose(merged, first + second)
    assert not np.array_equal(first != 0, second != 0)
    np.testing.assert_array_equal(merging.dare_linear([tensor], [1.0], 0.3, key), first)


def test_bad_merges_are_named():
    with pytest.raises(ValueError, match="give density"):
        merging.ties([T1, T2], [1.0, 1.0], density=None)
    with pytest.raises(ValueError, match="density must be >= 0"):
        merging.magnitude_prune([T1], [1.0], density=-1.0)
    with pytest.raises(ValueError, match="give a key"):
        merging.dare_ties([T1, T2], [1.0, 1.0], 0.5, None)
    with pytest.raises(ValueError, match="majority_sign_method"):
        merging.ties([T1, T2], [1.0, 1.0], 0.5, majority_sign_method="mean")
    with pytest.raises(ValueError, match="3 weights for 2"):
        merging.task_arithmetic([T1, T2], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="unknown merge"):
        merging.combine("average", [T1], [1.0])
