"""Section 7 analysis: subspace similarity and amplification against closed forms, and the
`lora_jax.analysis.compare` command on real tiny runs."""

import json
import math

import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import REPO_ROOT, tiny_config
from lora_jax.methods import lora_peft
from lora_jax.methods import lora
from lora_jax.analysis import (amplification, projection_norm, random_gaussian_like,
                               similarity_grid, subspace_similarity)
from lora_jax.analysis import compare

D = 32


def orthonormal_rows(n: int, d: int, seed: int) -> np.ndarray:
    """n orthonormal rows in R^d."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, n)))
    return q.T


def with_spectrum(directions: np.ndarray, singular_values) -> np.ndarray:
    """A whose right-singular vectors are `directions`, in the order of the decreasing values."""
    return np.asarray(singular_values, np.float64)[:, None] * directions


# --- Subspace similarity -------------------------------------------------------------------------

def test_identical_subspaces_give_one_everywhere():
    a = np.random.default_rng(0).standard_normal((8, D))
    grid = similarity_grid(a, a)
    assert grid.shape == (8, 8)
    np.testing.assert_allclose(np.diag(grid), 1.0, atol=1e-12)
    np.testing.assert_allclose(grid, 1.0, atol=1e-12)  # top-min(i, j) directions are shared


def test_nested_subspaces_give_one_where_min_directions_are_shared():
    v = orthonormal_rows(8, D, seed=1)
    a4 = with_spectrum(v[:4], [4, 3, 2, 1])
    a8 = with_spectrum(v, [8, 7, 6, 5, 4, 3, 2, 1])  # a4's directions are a8's top four
    np.testing.assert_allclose(similarity_grid(a4, a8), 1.0, atol=1e-12)


def test_shared_directions_at_the_bottom_give_the_counted_overlap():
    v = orthonormal_rows(8, D, seed=2)
    a4 = with_spectrum(v[:4], [4, 3, 2, 1])
    # a8's top four directions are new; a4's four come last. Top-i of a4 and top-j of a8 then
    # share min(i, j - 4) directions (none for j <= 4).
    a8 = with_spectrum(np.concatenate([v[4:], v[:4]]), [8, 7, 6, 5, 4, 3, 2, 1])
    i, j = np.meshgrid(np.arange(1, 5), np.arange(1, 9), indexing="ij")
    expected = np.clip(np.minimum(i, j - 4), 0, None) / np.minimum(i, j)
    np.testing.assert_allclose(similarity_grid(a4, a8), expected, atol=1e-12)


def test_orthogonal_subspaces_give_zero():
    v = orthonormal_rows(12, D, seed=3)
    rng = np.random.default_rng(3)
    a1 = rng.standard_normal((4, 4)) @ v[:4]
    a2 = rng.standard_normal((8, 8)) @ v[4:]
    np.testing.assert_allclose(similarity_grid(a1, a2), 0.0, atol=1e-12)


def test_two_lines_at_an_angle_give_cos_squared():
    theta = 0.3
    a1 = np.zeros((1, D)); a1[0, 0] = 1.0
    a2 = np.zeros((1, D)); a2[0, :2] = [math.cos(theta), math.sin(theta)]
    assert subspace_similarity(a1, a2, 1, 1) == pytest.approx(math.cos(theta) ** 2, abs=1e-12)


def test_invariant_to_rotation_within_the_subspace_and_to_scale():
    rng = np.random.default_rng(4)
    a1, a2 = rng.standard_normal((4, D)), rng.standard_normal((8, D))
    r, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    reference = similarity_grid(a1, a2)
    np.testing.assert_allclose(similarity_grid(r @ a1, a2), reference, atol=1e-10)
    np.testing.assert_allclose(similarity_grid(3.7 * a1, 1e-3 * a2), reference, atol=1e-10)


def test_left_side_compares_the_column_spaces_of_b():
    rng = np.random.default_rng(5)
    b1, b2 = rng.standard_normal((D, 4)), rng.standard_normal((D, 6))
    np.testing.assert_allclose(similarity_grid(b1, b2, side="left"),
                               similarity_grid(b1.T, b2.T, side="right"), atol=1e-12)
    assert subspace_similarity(b1, b2, 2, 5, side="left") == pytest.approx(
        similarity_grid(b1, b2, side="left")[1, 4], abs=0)


def test_independent_random_subspaces_give_max_over_d_on_average():
    # E ||U1_i^T U2_j||_F^2 = i j / d for independent uniform subspaces, so E[phi] = max(i, j) / d.
    r1, r2, d, n = 3, 6, 16, 2000
    k1, k2 = jax.random.split(jax.random.key(0))
    a1 = random_gaussian_like(np.empty((n, r1, d)), k1)  # Gaussian rows: uniform row spaces
    a2 = random_gaussian_like(np.empty((n, r2, d)), k2)
    samples = np.stack([similarity_grid(x, y) for x, y in zip(a1, a2)])
    mean = samples.mean(0)
    stderr = samples.std(0, ddof=1) / math.sqrt(n)
    i, j = np.meshgrid(np.arange(1, r1 + 1), np.arange(1, r2 + 1), indexing="ij")
    expected = np.maximum(i, j) / d
    # Fine enough to tell max(i, j) / d from its neighbours (e.g. (max + 1) / d): 1 / d = 0.0625.
    assert stderr.max() < 0.01
    # 4 standard errors: a correct implementation lands outside with probability ~6e-5 per entry.
    assert np.all(np.abs(mean - expected) < 4 * stderr), (mean, expected, stderr)


def test_subspace_similarity_names_bad_arguments():
    a = np.ones((4, D))
    with pytest.raises(ValueError, match="1 <= i <= 4"):
        subspace_similarity(a, a, 5, 1)
    with pytest.raises(ValueError, match="different spaces"):
        similarity_grid(a, np.ones((4, D + 1)))
    with pytest.raises(ValueError, match="side"):
        similarity_grid(a, a, side="top")


# --- Amplification -------------------------------------------------------------------------------

D_OUT, D_IN = 7, 6
SIGMA = np.array([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])


def frozen_with_spectrum(sigma=SIGMA):
    """W = U0 diag(sigma) V0 (d_out, d_in) with known singular vectors."""
    u0 = orthonormal_rows(D_OUT, D_OUT, seed=10).T
    v0 = orthonormal_rows(D_IN, D_IN, seed=11)
    k = len(sigma)
    return u0[:, :k] @ np.diag(sigma) @ v0[:k], u0, v0


def adapter_on(u0, v0, left, right, strengths):
    """B, A with B A = sum_k strengths[k] u0[:, left[k]] v0[right[k]]."""
    return u0[:, left] * np.asarray(strengths), v0[right]


def test_amplification_for_an_update_along_w_top_directions():
    w, u0, v0 = frozen_with_spectrum()
    b, a = adapter_on(u0, v0, [0, 1], [0, 1], [0.3, 0.4])
    stats = amplification(w, a, b, scale=2.0, key=jax.random.key(0))
    assert stats["rank"] == 2
    assert stats["dw_norm"] == pytest.approx(2.0 * 0.5, rel=1e-12)  # 2 * sqrt(0.3^2 + 0.4^2)
    assert stats["w_norm"] == pytest.approx(math.sqrt((SIGMA ** 2).sum()), rel=1e-12)
    assert stats["w_on_dw"] == pytest.approx(math.sqrt(36 + 25), rel=1e-12)
    assert stats["w_on_w"] == pytest.approx(math.sqrt(36 + 25), rel=1e-12)
    assert stats["dw_on_dw"] == pytest.approx(stats["dw_norm"], rel=1e-12)
    assert stats["amplification"] == pytest.approx(1.0 / math.sqrt(61), rel=1e-12)


def test_amplification_for_an_update_along_w_weakest_directions():
    w, u0, v0 = frozen_with_spectrum()
    b, a = adapter_on(u0, v0, [4, 5], [4, 5], [1.0, 0.5])
    stats = amplification(w, a, b, scale=0.5, key=jax.random.key(1))
    assert stats["w_on_dw"] == pytest.approx(math.sqrt(4 + 1), rel=1e-12)
    assert stats["w_on_w"] == pytest.approx(math.sqrt(36 + 25), rel=1e-12)  # still W's top two
    assert stats["amplification"] == pytest.approx(0.5 * math.sqrt(1.25) / math.sqrt(5), rel=1e-12)


def test_amplification_for_an_update_orthogonal_to_w():
    w, u0, v0 = frozen_with_spectrum()
    # Left directions of W's singular pairs 0, 1 with right directions of pairs 2, 3: W maps none
    # of dW's input directions onto its output directions, so U^T W V^T = 0.
    b, a = adapter_on(u0, v0, [0, 1], [2, 3], [1.0, 0.5])
    stats = amplification(w, a, b, scale=1.0, key=jax.random.key(2))
    assert stats["w_on_dw"] == pytest.approx(0.0, abs=1e-12)
    assert stats["amplification"] > 1e10
    # The same update, now in the null space of a rank-3 W.
    w3, u0, v0 = frozen_with_spectrum(SIGMA[:3])
    b, a = adapter_on(u0, v0, [3, 4], [3, 4], [1.0, 0.5])
    assert amplification(w3, a, b, 1.0, jax.random.key(3))["w_on_dw"] == pytest.approx(0, abs=1e-12)


def test_no_rank_r_projection_exceeds_w_own_top_r():
    rng = np.random.default_rng(12)
    w = rng.standard_normal((D_OUT, D_IN))
    for seed in range(5):
        a, b = rng.standard_normal((3, D_IN)), rng.standard_normal((D_OUT, 3))
        stats = amplification(w, a, b, 1.0, jax.random.key(seed))
        top3 = math.sqrt((np.linalg.svd(w, compute_uv=False)[:3] ** 2).sum())
        assert stats["w_on_w"] == pytest.approx(top3, rel=1e-12)
        assert stats["w_on_dw"] <= top3 + 1e-12 and stats["w_on_random"] <= top3 + 1e-12


def test_projection_norm_ignores_the_basis_within_the_subspaces():
    rng = np.random.default_rng(13)
    w = rng.standard_normal((D_OUT, D_IN))
    u, _ = np.linalg.qr(rng.standard_normal((D_OUT, 3)))
    v = orthonormal_rows(3, D_IN, seed=14)
    r1, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    r2, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    assert projection_norm(w, u @ r1, r2 @ v) == pytest.approx(projection_norm(w, u, v), rel=1e-12)


def test_amplification_refuses_an_untransposed_kernel():
    a, b = np.ones((2, D_IN)), np.ones((D_OUT, 2))
    with pytest.raises(ValueError, match="transpose"):
        amplification(np.ones((D_IN, D_OUT)), a, b, 1.0, jax.random.key(0))


# --- Adapted matrices of split outputs -----------------------------------------------------------

PARTS = (True, False, True)


def split_setup():
    d, rank = 8, 2
    params = {"h_0": {"attn": {"c_attn": {"kernel": np.random.default_rng(20).standard_normal(
        (d, 3 * d)).astype(np.float32)}}}}
    spec = lora.LoraSpec(targets=("attn/c_attn",), rank=rank, alpha=3.0,
                         split_outputs={"attn/c_attn": PARTS})
    frozen, trainable = lora.split(spec, params, jax.random.key(0))
    # Non-zero B, as after training.
    module = trainable["lora"]["h_0"]["attn"]["c_attn"]
    module["lora_b"] = jax.random.normal(jax.random.key(1), module["lora_b"].shape)
    return spec, frozen, trainable


def test_split_outputs_become_one_matrix_per_part_with_its_slice_of_w():
    spec, frozen, trainable = split_setup()
    matrices = compare.adapted_matrices(spec, frozen, trainable)
    assert list(matrices) == ["h_0/attn/c_attn[q]", "h_0/attn/c_attn[v]"]
    kernel = np.asarray(frozen["h_0"]["attn"]["c_attn"]["kernel"], np.float64)
    delta = np.asarray(lora.merge(spec, frozen, trainable)["h_0"]["attn"]["c_attn"]["kernel"],
                       np.float64) - kernel
    for m, p in zip(matrices.values(), (0, 2)):
        cols = slice(8 * p, 8 * (p + 1))
        np.testing.assert_array_equal(m.w, kernel[:, cols].T)
        np.testing.assert_allclose(m.scale * m.b @ m.a, delta[:, cols].T, atol=1e-5)
        assert m.scale == 1.5


def test_fused_export_splits_back_exactly():
    spec, frozen, trainable = split_setup()
    ab = trainable["lora"]["h_0"]["attn"]["c_attn"]
    a, b = np.asarray(ab["lora_a"]), np.asarray(ab["lora_b"])
    fused_a, fused_b = lora_peft._fused(a, b, PARTS)  # what export_peft writes
    back_a, back_b = compare.unfuse(fused_a, fused_b, PARTS)
    np.testing.assert_array_equal(back_a, a)
    np.testing.assert_array_equal(back_b, b)
    # As load_peft reads a run's export: one rank-2r adapter with alpha 2 * alpha.
    fused_spec = lora.LoraSpec(targets=(r"^h_0/attn/c_attn/kernel$",), rank=4, alpha=6.0)
    module = ("h_0", "attn", "c_attn")
    fused = {"lora": traverse_util.unflatten_dict(
        {module + ("lora_a",): fused_a, module + ("lora_b",): fused_b})}
    native = compare.adapted_matrices(spec, frozen, trainable)
    loaded = compare.adapted_matrices(fused_spec, frozen, fused, split_outputs=spec.split_outputs)
    assert list(loaded) == list(native)
    for name in native:
        np.testing.assert_array_equal(loaded[name].a, native[name].a)
        np.testing.assert_array_equal(loaded[name].b, native[name].b)
        assert loaded[name].scale == native[name].scale
    with pytest.raises(ValueError, match="not a fused split-output adapter"):
        compare.unfuse(fused_a, fused_b + 1.0, PARTS)


# --- The command on real runs --------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from lora_jax.train import train

    root = tmp_path_factory.mktemp("runs")
    made = {}
    for name, overrides in {"r4": {}, "r4_seed1": {"seed": 1}, "r8": {"method.lora.rank": 8}}.items():
        config = tiny_config(**{"train.max_steps": 4, "method.lora.rank": 4, **overrides})
        train(config, root / name)
        made[name] = root / name
    return made


def check_png(path):
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000, path
    pixels = imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200 and pixels.std() > 0.05, path


@pytest.fixture(scope="module")
def r4_vs_r8(runs, tmp_path_factory):
    """The command's output for the rank-4 and rank-8 runs (same seed, so the same base)."""
    out = tmp_path_factory.mktemp("r4_vs_r8")
    compare.main([str(runs["r4"]), str(runs["r8"]), "--out", str(out)])
    return out


def test_compare_writes_grids_heatmaps_and_amplification(r4_vs_r8):
    out = r4_vs_r8
    similarity = json.loads((out / "similarity.json").read_text())
    matrices = similarity["matrices"]
    assert len(matrices) == 4  # query and value in 2 layers
    for name, entry in matrices.items():
        for result in (entry, entry["random"]):
            grid = np.array(result["grid"])
            assert grid.shape == (4, 8) and result["shape"] == [4, 8]
            assert np.all((grid >= 0) & (grid <= 1))
            assert result["phi_11"] == grid[0, 0] and result["mean"] == pytest.approx(grid.mean())
        safe = name.replace("/", "_")
        check_png(out / f"phi_{safe}.png")
    check_png(out / "summary.png")
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        ["summary.png"] + [f"phi_{n.replace('/', '_')}.png" for n in matrices])

    table = json.loads((out / "amplification.json").read_text())["matrices"]
    assert list(table) == list(matrices)
    for stats in table.values():
        assert set(stats) == {"rank", "dw_norm", "w_norm", "w_on_dw", "w_on_w", "w_on_random",
                              "dw_on_dw", "random_on_dw", "amplification"}
        assert stats["rank"] == 4 and stats["dw_norm"] > 0
        assert stats["dw_on_dw"] == pytest.approx(stats["dw_norm"], rel=1e-9)
        assert stats["amplification"] == pytest.approx(stats["dw_norm"] / stats["w_on_dw"])

    counted = json.loads((out / "intruders.json").read_text())
    assert (counted["k"], counted["epsilon"]) == (10, 0.5)
    for run, counts in counted["runs"].items():
        assert list(counts) == list(matrices)
        assert all(isinstance(c, int) and 0 <= c <= 10 for c in counts.values())


def test_intruder_counts_of_adapters_with_planted_intruders():
    """W + s B A whose top directions are planted (tests/test_intruders.py's construction): the
    count per adapted matrix is the number planted."""
    from test_intruders import OWN, SPREAD, planted

    made = {}
    for name, intruders in (("q", 0), ("v", 3)):
        w0, w = planted(SPREAD[:intruders] + OWN[:10 - intruders], seed=len(made))
        # dW = (W - W0) as s B A with B = I, A = (W - W0) / s: a full-rank "adapter".
        made[name] = compare.AdaptedMatrix(a=(w - w0) / 2.0, b=np.eye(w.shape[0]), scale=2.0,
                                           w=w0)
    assert compare.intruder_counts(made) == {"q": 0, "v": 3}
    assert compare.intruder_counts(made, epsilon=0.2) == {"q": 0, "v": 0}


def test_compare_one_module_between_seeds(runs, tmp_path):
    out = tmp_path / "seeds"
    compare.main([str(runs["r4"]), str(runs["r4_seed1"]), "--out", str(out),
                  "--module", "layer_1/.*/value", "--side", "left"])
    matrices = json.loads((out / "similarity.json").read_text())["matrices"]
    assert list(matrices) == ["bert/encoder/layer_1/attention/self/value"]
    assert np.array(matrices["bert/encoder/layer_1/attention/self/value"]["grid"]).shape == (4, 4)
    assert len(list(out.glob("*.png"))) == 2


def test_a_peft_directory_on_its_base_gives_the_runs_numbers(runs, r4_vs_r8, tmp_path, capsys):
    base = str(REPO_ROOT / "configs/glue.py") + ":task=sst2,model=tiny"  # seed 0, as run r4
    compare.main([str(runs["r4"] / "adapter"), str(runs["r8"]), "--out", str(tmp_path),
                  "--base", base])
    for name in ("similarity.json", "amplification.json"):
        assert (json.loads((tmp_path / name).read_text())["matrices"]
                == json.loads((r4_vs_r8 / name).read_text())["matrices"])
    assert "phi(1,1)" in capsys.readouterr().out  # a one-line summary per matrix


def test_a_peft_directory_without_base_is_a_usage_error(runs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare.main([str(runs["r4"] / "adapter"), str(runs["r8"]), "--out", str(tmp_path)])
    assert "--base" in capsys.readouterr().err


# --- The notebook ---------------------------------------------------------------------------------

NOTEBOOK = REPO_ROOT / "notebooks" / "subspace_similarity.ipynb"


def test_the_notebook_runs_on_tiny_adapters_and_reports_the_librarys_numbers(runs, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # The kernel inherits the environment: Figure 3 compares r4 with r8, Figure 4 two seeds at r4.
    for variable, run in {"RUN_SMALL": "r4", "RUN_LARGE": "r8", "RUN_SEED_A": "r4",
                          "RUN_SEED_B": "r4_seed1"}.items():
        monkeypatch.setenv(variable, str(runs[run]))
    monkeypatch.setenv("MATRIX", "query")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # Figures 3 and 4
    summary = json.loads(notebook.cells[-1].outputs[0].text)

    small, large, seed_a, seed_b = compare.load_adapters(
        [runs["r4"], runs["r8"], runs["r4"], runs["r4_seed1"]])
    assert summary["detail"] == "bert/encoder/layer_1/attention/self/query"  # the last match
    assert summary["ranks"] == [4, 8]
    assert list(summary["fig3_phi_11"]) == list(small) and len(small) == 4
    for name in small:
        assert summary["fig3_phi_11"][name] == pytest.approx(
            similarity_grid(small[name].a, large[name].a)[0, 0], abs=1e-12)
        assert summary["fig4_phi_11"][name] == pytest.approx(
            similarity_grid(seed_a[name].a, seed_b[name].a)[0, 0], abs=1e-12)
        assert summary["fig4_left_phi_11"][name] == pytest.approx(
            similarity_grid(seed_a[name].b, seed_b[name].b, side="left")[0, 0], abs=1e-12)
    m = small[summary["detail"]]
    expected = amplification(m.w, m.a, m.b, m.scale, jax.random.fold_in(jax.random.key(0), 7))
    assert summary["amplification"]["small"] == pytest.approx(expected["amplification"])


def test_initial_adapters_are_the_ones_the_trainer_drew(tmp_path):
    from lora_jax.train import train

    frozen_run = tmp_path / "lr0"
    train(tiny_config(**{"train.max_steps": 2, "method.lora.rank": 4, "optim.lr": 0.0, "seed": 3}),
          frozen_run)  # nothing moves: the final adapters are the initial ones
    (final,) = compare.load_adapters([frozen_run])
    moved = compare.movement_from_init(final, compare.initial_adapters(frozen_run))
    assert len(moved) == 4
    for stats in moved.values():
        assert stats["relative_change"] == 0.0
        assert stats["phi_rr"] == pytest.approx(1.0) and stats["phi_11"] == pytest.approx(1.0)


def test_compare_against_init_reports_how_far_a_moved(runs, tmp_path, capsys):
    out = tmp_path / "init"
    compare.main([str(runs["r4"]), str(runs["r8"]), "--out", str(out), "--against-init"])
    moved = json.loads((out / "init_similarity.json").read_text())
    assert list(moved) == [str(runs["r4"]), str(runs["r8"])]
    for table in moved.values():
        assert len(table) == 4
        for stats in table.values():
            assert 0 < stats["relative_change"] < 1  # 4 steps at lr 5e-4 move A a little
            assert 0.5 < stats["phi_rr"] <= 1.0
    assert "phi(A, A_0, r, r)" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a PEFT directory has no seed to re-derive A_0 from
        compare.main([str(runs["r4"] / "adapter"), str(runs["r8"]), "--out", str(tmp_path / "x"),
                      "--base", str(REPO_ROOT / "configs/glue.py") + ":task=sst2,model=tiny",
                      "--against-init"])
