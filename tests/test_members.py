"""A study's members trained as one program equal their separate runs (lora_jax.training.members)."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import tiny_config
from lora_jax.errors import ConfigError
from lora_jax.models import FAMILIES
from lora_jax.training import members, setup, sharding
from lora_jax.training.base_model import run_keys

STEPS = 20
Q, K, V, O = (r"/attention/self/query/kernel", r"/attention/self/key/kernel",
              r"/attention/self/value/kernel", r"/attention/output/dense/kernel")


def save_tiny_bert(directory, dropout: float):
    """A random 2-layer BERT classifier saved with transformers (MiniLM's vocabulary): a
    pretrained base, so its weights do not depend on the members' seeds."""
    import torch
    import transformers

    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=64, num_labels=2,
                                     hidden_dropout_prob=dropout,
                                     attention_probs_dropout_prob=dropout)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """Without dropout: members of other seeds (other data orders, batches of other widths)."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), 0.0)


@pytest.fixture(scope="module")
def dropout_bert_dir(tmp_path_factory):
    """With BERT's dropout of 0.1."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-dropout"), 0.1)


def member_config(base_dir, seed, rank, alpha, targets, lr, rslora=False):
    return tiny_config(**{
        "model.name": str(base_dir), "model.tokenizer": "minilm", "seed": seed,
        "method.lora.rank": rank, "method.lora.alpha": alpha, "method.lora.targets": targets,
        "method.lora.rslora": rslora, "optim.lr": lr, "train.max_steps": STEPS})


def test_a_group_reads_its_checkpoint_once_and_draws_each_members_head(tmp_path, monkeypatch):
    """A base without a classifier: each member's head is drawn from its own seed, as its own
    run draws it, while the checkpoint is read once for the whole group."""
    import torch
    import transformers

    from lora_jax.interop import hub

    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "bare")
    configs = [member_config(tmp_path / "bare", seed, 4, 8.0, (Q, V), 1e-3) for seed in range(3)]
    # Counted where the weights are read into params (file headers may be read again).
    reads, read = [], hub.params_from_state_dict
    monkeypatch.setattr(hub, "params_from_state_dict",
                        lambda model, state, **kw: (reads.append(state), read(model, state, **kw))[1])
    group = members.MemberGroup.build(configs)
    assert len(reads) == 1
    heads = []
    for i, config in enumerate(configs):
        got = traverse_util.flatten_dict(group.member_trainable(group.trainable, i)["params"])
        want = traverse_util.flatten_dict(jax.device_get(setup.build(config).trainable["params"]))
        assert got.keys() == want.keys() and any("classifier" in p for p in want)
        assert all(np.array_equal(got[p], want[p]) for p in want), f"member {i}"
        heads.append(np.concatenate([np.ravel(v) for v in want.values()]))
    assert not np.array_equal(heads[0], heads[1])  # the seeds drew other heads


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_familys_dropout_counts_when_runs_are_grouped(model_type):
    """Each family names its HF dropout fields; a base with dropout in any of them has dropout
    (a Llama's attention_dropout counted as none before: only BERT's and GPT-2's were known)."""
    fields = FAMILIES[model_type].dropout_fields
    assert fields
    for field in fields:
        model = tiny_config().model
        with model.unlocked():
            model.name = ""
            model.random_init = {"model_type": model_type, field: 0.25}
        assert members.base_dropout(model) == 0.25, field


@pytest.fixture(scope="module")
def study(tiny_bert_dir):
    """Three members differing in seed, rank, alpha, rsLoRA, targets and learning rate."""
    return [member_config(tiny_bert_dir, 0, 4, 8.0, (Q, V), 1e-3),
            member_config(tiny_bert_dir, 1, 8, 16.0, (Q,), 5e-4, rslora=True),
            member_config(tiny_bert_dir, 2, 2, 4.0, (Q, K, V, O), 2e-3)]


def separate_run(config):
    """(per-step losses, final trainable tree) of the config's run, stepped as the trainer does."""
    run = setup.build(config)
    training = setup.for_training(run)
    trainable, opt_state = run.trainable, training.opt_state
    key = run_keys(config.seed)[2]
    losses = []
    for step in range(STEPS):
        epoch, index = divmod(step, training.steps_per_epoch)
        host = training.task.train_batches(config.data.batch_size, config.seed, epoch)[index]
        batch = sharding.global_batch(host, run.mesh, config.optim.grad_accum)
        trainable, opt_state, loss, _ = training.train_step(
            run.frozen, trainable, opt_state, batch, jax.random.fold_in(key, step))
        losses.append(float(loss))
    return np.array(losses), jax.device_get(trainable)


def train_together(configs):
    """(losses [member, step], final stacked trainable, group, widths of the steps' batches)."""
    group = members.MemberGroup.build(configs)
    assert members.groups(configs) == [list(range(len(configs)))]
    trainable, opt_state = group.trainable, group.opt_state
    together, widths = [], set()
    for step in range(STEPS):
        batch, _ = group.batch(step)
        widths.add(batch["input_ids"].shape[-1])
        trainable, opt_state, losses, finite = group.step(trainable, opt_state, batch, step)
        assert np.asarray(finite).all()
        together.append(np.asarray(losses))
    return np.stack(together, axis=1), trainable, group, widths


def assert_members_equal_their_runs(configs, together, trainable, group):
    for i, config in enumerate(configs):
        losses, expected = separate_run(config)
        np.testing.assert_allclose(together[i], losses, rtol=1e-5, err_msg=f"member {i}")
        got = traverse_util.flatten_dict(group.member_trainable(trainable, i))
        want = traverse_util.flatten_dict(expected)
        assert got.keys() == want.keys()
        for path, value in want.items():
            assert got[path].shape == value.shape, path
            np.testing.assert_allclose(got[path], value, atol=1e-5, rtol=1e-5,
                                       err_msg=f"member {i} {path}")
        # The padding (ranks beyond the member's, kernels it does not target) stayed exactly 0.
        padding = group.padding(trainable, i)
        assert sum(v.size for v in padding.values()) > 0
        assert all(not np.any(v) for v in padding.values())


def test_members_of_other_seeds_ranks_and_rates_equal_their_separate_runs(study):
    together, trainable, group, widths = train_together(study)
    assert group.steps_per_epoch < STEPS  # the data order crosses an epoch for every member
    assert len(widths) > 1  # steps of several lengths: the members' batches were padded
    assert_members_equal_their_runs(study, together, trainable, group)
    # The members did differ: their first losses are not all the same (seeds, heads, data).
    assert len({round(float(x), 6) for x in together[:, 0]}) == 3


@pytest.mark.slow  # ~30 s; the seeds test above holds the same equality without dropout
def test_members_with_the_models_dropout_draw_their_runs_masks(dropout_bert_dir):
    """With dropout on, members of one seed (one data order) share a program: each draws the
    dropout masks its run draws."""
    configs = [member_config(dropout_bert_dir, 0, 4, 8.0, (Q, V), 1e-3),
               member_config(dropout_bert_dir, 0, 8, 4.0, (Q,), 3e-3, rslora=True)]
    together, trainable, group, _ = train_together(configs)
    assert_members_equal_their_runs(configs, together, trainable, group)


def test_groups_split_what_cannot_share_a_program(tiny_bert_dir, dropout_bert_dir):
    base = member_config(tiny_bert_dir, 0, 4, 8.0, (Q, V), 1e-3)
    other_rank = member_config(tiny_bert_dir, 1, 8, 8.0, (Q,), 2e-3)
    other_batch = tiny_config(**{"model.name": str(tiny_bert_dir), "model.tokenizer": "minilm",
                                 "data.batch_size": 8})
    bitfit = tiny_config(**{"model.name": str(tiny_bert_dir), "model.tokenizer": "minilm",
                            "method.use": ("bitfit",)})
    # Random base weights come from the seed: two seeds of a random-init model cannot share one.
    random_0, random_1 = tiny_config(seed=0), tiny_config(seed=1)
    assert members.groups([base, other_rank, other_batch, bitfit, random_0, random_1]) == [
        [0, 1], [2], [3], [4], [5]]
    # With the model's dropout, other seeds share a program only if every batch has one width.
    dropout = [member_config(dropout_bert_dir, s, 4, 8.0, (Q, V), 1e-3) for s in (0, 1)]
    assert members.groups(dropout) == [[0], [1]]
    for config in dropout:
        config.data.buckets = (32,)  # = max_len: one width
    assert members.groups(dropout) == [[0, 1]]
    with pytest.raises(ConfigError, match="cannot train as one program"):
        members.MemberGroup.build([base, other_batch])


def read_metrics(workdir):
    import json

    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
            if line]


def adapter_tensors(directory):
    from safetensors.numpy import load_file

    files = sorted(directory.glob("*.safetensors"))
    assert files, directory
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def test_train_together_writes_each_members_workdir_as_its_run(tiny_bert_dir, tmp_path):
    """Two members trained together: each workdir's losses, evaluations, best and final exports
    equal its separate run's; its checkpoint is its run's (the trainer resumes from it)."""
    from lora_jax.train import train, train_members

    configs = [member_config(tiny_bert_dir, 0, 4, 8.0, (Q, V), 1e-3),
               member_config(tiny_bert_dir, 1, 8, 16.0, (Q,), 2e-3)]
    for c in configs:
        c.train.max_steps = 8
    together = train_members(configs, [tmp_path / "together" / f"m{i}" for i in range(2)])
    for i, config in enumerate(configs):
        alone = train(config, tmp_path / "alone" / f"m{i}")
        mine = tmp_path / "together" / f"m{i}"
        assert together[i]["trained_params"] == alone["trained_params"]
        assert together[i]["best"]["step"] == alone["best"]["step"]
        np.testing.assert_allclose(together[i]["accuracy"], alone["accuracy"], rtol=1e-5)
        got, want = read_metrics(mine), read_metrics(tmp_path / "alone" / f"m{i}")
        rows = lambda records: [(r["step"], r["split"]) for r in records if r["split"] != "compile"]
        assert rows(got) == rows(want)
        for g, w in zip(got, want):
            if g["split"] == "compile":
                continue
            for key, value in w.items():
                if isinstance(value, float) and key != "tokens_per_s":  # a timing
                    np.testing.assert_allclose(g[key], value, rtol=1e-5, atol=1e-7,
                                               err_msg=f"member {i} step {w['step']} {key}")
        for export in ("adapter", "best_adapter"):
            g_t = adapter_tensors(mine / export)
            w_t = adapter_tensors(tmp_path / "alone" / f"m{i}" / export)
            assert g_t.keys() == w_t.keys()
            for key in w_t:
                np.testing.assert_allclose(g_t[key], w_t[key], atol=1e-5, err_msg=key)
        # The member's checkpoint restores into its own run, which finds nothing left to train.
        again = train(config, mine)
        np.testing.assert_allclose(again["accuracy"], together[i]["accuracy"], rtol=1e-6)


@pytest.mark.slow  # ~25 s; the workdir test above resumes a member's checkpoint in the trainer
def test_train_together_resumes_its_members_after_a_preemption(tiny_bert_dir, tmp_path,
                                                               monkeypatch):
    """Stopped at step 4 (as by SIGTERM: every member checkpoints step 4), a rerun resumes all
    members there and ends with the uninterrupted run's adapters, bit for bit."""
    from lora_jax.errors import Preempted
    from lora_jax.train import train_members
    from lora_jax.training import loop
    from lora_jax.training.preemption import PreemptionNotice

    configs = [member_config(tiny_bert_dir, 0, 4, 8.0, (Q, V), 1e-3),
               member_config(tiny_bert_dir, 1, 8, 16.0, (Q,), 2e-3)]
    for c in configs:
        c.train.max_steps = 8
    whole = [tmp_path / "whole" / f"m{i}" for i in range(2)]
    cut = [tmp_path / "cut" / f"m{i}" for i in range(2)]
    train_members(configs, whole)

    class StopAtStep4(PreemptionNotice):
        def reached(self, step: int) -> bool:
            return step == 4

    monkeypatch.setattr(loop, "PreemptionNotice", StopAtStep4)
    with pytest.raises(Preempted, match="step 4"):
        train_members(configs, cut)
    assert all(not (d / "adapter").exists() for d in cut)
    assert all((d / "checkpoints" / "4").is_dir() for d in cut)
    monkeypatch.undo()
    train_members(configs, cut)
    for w, c in zip(whole, cut):
        got, want = adapter_tensors(c / "adapter"), adapter_tensors(w / "adapter")
        assert got.keys() == want.keys()
        assert all(np.array_equal(got[k], want[k]) for k in want)
