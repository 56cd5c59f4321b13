"""The ablation configs expand to the paper's settings; a tiny sweep trains, reports and resumes."""

import csv
import json
import pathlib
import shutil

import numpy as np
import pytest

from experiments import sweep
from lora_jax.config import load_config
from lora_jax.training import environment

ABLATIONS = str(pathlib.Path(__file__).resolve().parents[1] / "configs/ablations.py")
Q, K, V, O = (r"/attention/self/query/kernel", r"/attention/self/key/kernel",
              r"/attention/self/value/kernel", r"/attention/output/dense/kernel")


def runs(arg):
    return {r["name"]: r for r in load_config(f"{ABLATIONS}:{arg}").runs}


def test_rank_study_is_table_6():
    named = runs("study=rank")
    assert len(named) == 15
    assert {(r["targets"], r["rank"]) for r in named.values()} == {
        (t, r) for t in ("q", "qv", "qkvo") for r in (1, 2, 4, 8, 64)}
    run = named["rank=64,targets=qkvo,seed=0"]
    assert run["overrides"] == {"method.lora.rank": 64, "method.lora.targets": (Q, K, V, O), "seed": 0}
    assert named["rank=1,targets=q,seed=0"]["overrides"]["method.lora.targets"] == (Q,)


def test_targets_study_is_table_5():
    named = runs("study=targets")
    assert list(named) == [
        "rank=8,targets=q,seed=0", "rank=8,targets=k,seed=0", "rank=8,targets=v,seed=0",
        "rank=8,targets=o,seed=0", "rank=4,targets=qk,seed=0", "rank=4,targets=qv,seed=0",
        "rank=2,targets=qkvo,seed=0"]
    assert named["rank=4,targets=qk,seed=0"]["overrides"]["method.lora.targets"] == (Q, K)
    assert named["rank=8,targets=o,seed=0"]["overrides"]["method.lora.targets"] == (O,)


def test_seeds_study_and_arguments():
    assert list(runs("study=seeds")) == [f"rank=8,targets=qv,seed={s}" for s in range(3)]
    named = runs("study=seeds,seeds=5")
    assert [r["overrides"]["seed"] for r in named.values()] == [0, 1, 2, 3, 4]
    assert len(runs("study=rank,seeds=2")) == 30
    c = load_config(f"{ABLATIONS}:study=targets,task=rte,steps=100")
    assert (c.base.data.task, c.base.train.max_steps, c.base.model.name) == ("rte", 100, "minilm")
    # RTE is a sentence-pair task: MiniLM's max length 64 becomes 128.
    assert (c.base.data.batch_size, c.base.optim.lr, c.base.data.max_len) == (32, 1e-3, 128)
    sst2 = load_config(f"{ABLATIONS}:study=targets,task=sst2")
    assert sst2.base.data.max_len == 64
    assert c.base.method.lora.alpha == 8.0  # fixed across ranks, as in the paper
    with pytest.raises(ValueError, match="study"):
        load_config(f"{ABLATIONS}:study=depth")


def test_run_config_applies_overrides_to_a_copy():
    c = load_config(f"{ABLATIONS}:study=rank,model=tiny")
    run = runs("study=rank,model=tiny")["rank=2,targets=qkvo,seed=0"]
    config = sweep.run_config(c.base, run)
    assert (config.method.lora.rank, tuple(config.method.lora.targets)) == (2, (Q, K, V, O))
    assert c.base.method.lora.rank == 8


def test_summarize_median_min_max():
    records = [{"method": "lora", "targets": "qv", "rank": 8, "trained_params": 5, "best": b,
                "final": f} for b, f in ((0.9, 0.5), (0.7, 0.6), (0.8, 0.1), (0.6, 0.2))]
    records.append({"method": "lora", "targets": "q", "rank": 1, "trained_params": 1,
                    "best": 0.3, "final": 0.3})
    records.append(sweep.with_current_fields(  # a record from before the methods study
        {"targets": "q", "rank": 1, "trainable_params": 1, "best": 0.5, "final": 0.5}))
    assert sweep.summarize(records) == [
        {"method": "lora", "targets": "qv", "rank": 8, "trained_params": 5, "runs": 4,
         "median": pytest.approx(0.75), "min": 0.6, "max": 0.9,
         "final_median": pytest.approx(0.35)},
        {"method": "lora", "targets": "q", "rank": 1, "trained_params": 1, "runs": 2,
         "median": 0.4, "min": 0.3, "max": 0.5, "final_median": 0.4}]


TINY = ["base.data.max_train_examples=256", "base.data.max_eval_examples=64",
        "base.data.max_len=32", "base.data.batch_size=16", "base.data.eval_batch_size=32",
        "base.train.max_steps=4"]


def test_tiny_sweep_reports_and_skips_finished_runs(tmp_path, capsys):
    argv = tiny_sweep("study=rank,model=tiny", tmp_path, r"^rank=(1|4),targets=qv,")
    first = sweep.main(argv)
    assert [r["name"] for r in first] == ["rank=1,targets=qv,seed=0", "rank=4,targets=qv,seed=0"]
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["rank"]) for r in rows] == [1, 4]
    assert {r["metric"] for r in rows} == {"accuracy"}
    # Tiny BERT: width 32, 2 layers, q and v: 2 * 2 * r * (32 + 32) LoRA scalars.
    assert [int(r["lora_params"]) for r in rows] == [256, 1024]
    assert all(int(r["trained_params"]) > int(r["lora_params"]) for r in rows)  # + classifier
    assert (tmp_path / "results.md").read_text().count("targets=qv,seed=0 |") == 2
    assert (tmp_path / "rank.png").read_bytes()[:4] == b"\x89PNG"
    assert "training rank=4" in capsys.readouterr().out

    second = sweep.main(argv)
    out = capsys.readouterr().out
    assert out.count("skipping") == 2 and "training" not in out
    assert second == first  # the recorded wall times come back unchanged
    record = json.loads((tmp_path / "rank=1,targets=qv,seed=0" / "record.json").read_text())
    assert record["wall_s"] == first[0]["wall_s"]
    # Every dev metric of the last evaluation is kept, the main one equal to `final`.
    assert set(record["metrics"]) == {"loss", "accuracy"}
    assert record["metrics"]["accuracy"] == record["final"] and record["metrics"]["loss"] > 0
    # And where it ran: this process's software and machine, once (it did not resume elsewhere).
    assert record["environments"] == [environment.describe()]


def test_records_dir_resumes_a_sweep_whose_run_directories_are_gone(tmp_path, capsys):
    """--records keeps each finished run's record apart from its run directory (which holds the
    checkpoints and exports), so a sweep resumes from the records alone, e.g. on another machine."""
    argv = tiny_sweep("study=rank,model=tiny", tmp_path / "runs", r"^rank=1,targets=qv,")
    first = sweep.main([*argv, "--records", str(tmp_path / "records")])
    kept = tmp_path / "records" / "rank=1,targets=qv,seed=0.json"
    assert json.loads(kept.read_text()) == first[0]
    shutil.rmtree(tmp_path / "runs")
    capsys.readouterr()
    second = sweep.main([*argv, "--records", str(tmp_path / "records")])
    out = capsys.readouterr().out
    assert f"skipping rank=1,targets=qv,seed=0: its record is {kept}" in out
    assert "training" not in out and second == first
    assert not (tmp_path / "runs" / "rank=1,targets=qv,seed=0").exists()  # nothing retrained
    assert (tmp_path / "runs" / "results.csv").is_file()  # the tables are rewritten from records


def test_only_that_matches_nothing_lists_runs(tmp_path):
    with pytest.raises(ValueError, match="rank=64,targets=qkvo,seed=0"):
        sweep.main(["--config", f"{ABLATIONS}:study=rank,model=tiny", "--out", str(tmp_path),
                    "--only", "nothing"])


def test_gpt2_studies_adapt_slices_of_the_fused_c_attn_and_c_proj():
    named = runs("study=targets,task=e2e,model=tiny")
    assert named["rank=8,targets=k,seed=0"]["overrides"] == {
        "method.lora.rank": 8, "method.lora.targets": ("attn/c_attn",),
        "method.lora.split_outputs": {"attn/c_attn": (False, True, False)}, "seed": 0}
    assert named["rank=8,targets=o,seed=0"]["overrides"]["method.lora.targets"] == ("attn/c_proj",)
    assert named["rank=8,targets=o,seed=0"]["overrides"]["method.lora.split_outputs"] == {}
    assert named["rank=2,targets=qkvo,seed=0"]["overrides"]["method.lora.split_outputs"] == {
        "attn/c_attn": (True, True, True)}
    c = load_config(f"{ABLATIONS}:study=rank,task=e2e")
    assert (c.base.data.task, c.base.model.name) == ("e2e", "openai-community/gpt2-medium")


def tiny_sweep(arg: str, out, only: str, *sets: str) -> list[str]:
    """Arguments of a sweep of ablations `arg` on tiny runs, the runs matching `only`."""
    return ["--config", f"{ABLATIONS}:{arg}", "--out", str(out), "--only", only,
            *[f"--set={s}" for s in (*TINY, *sets)]]


@pytest.mark.slow  # ~30 s; the GPT-2 runs' overrides are checked without training above
def test_tiny_gpt2_sweep_trains_slices_and_the_output_projection(tmp_path):
    argv = tiny_sweep("study=targets,task=e2e,model=tiny", tmp_path, r"targets=(o|qk),",
                      "base.data.max_len=64")
    records = {r["targets"]: r for r in sweep.main(argv)}
    assert set(records) == {"o", "qk"}
    assert {r["metric"] for r in records.values()} == {"loss"}
    # Tiny GPT-2: width 32, 2 layers; c_proj and each c_attn slice are 32 x 32 matrices. (The
    # PEFT export pads a slice's B to all of c_attn; the count is of what was trained.)
    assert records["o"]["lora_params"] == 2 * 8 * (32 + 32)
    assert records["qk"]["lora_params"] == 2 * 2 * 4 * (32 + 32)
    assert all(r["trained_params"] == r["lora_params"] for r in records.values())  # no head


def test_methods_study_is_every_baseline_of_the_experiment_config():
    named = runs("study=methods")
    # configs/glue.py's METHODS (Table 2's baselines, then LoRA's successors), then the runs at
    # matched budgets (configs/ablations.py MATCHED_BUDGET, on MiniLM).
    assert list(named) == [f"method={m},seed=0" for m in
                           ("lora", "full", "bitfit", "adapter_h", "adapter_p", "adapter_d",
                            "dora", "pissa", "olora", "milora", "corda", "lora_ga", "eva",
                            "lora_fa", "loha", "lokr", "lora_plus", "vera", "lora_r64",
                            "adapter_p_r15")]
    # On MiniLM the adapter and bias methods take the miniature's lr 1e-3 (configs/glue.py's own
    # rate, BitFit's 4e-4, is for RoBERTa-base); FT and VeRA keep theirs.
    assert named["method=bitfit,seed=0"]["overrides"] == {
        "method.use": ("bitfit",), "optim.lr": 1e-3, "seed": 0}
    assert named["method=full,seed=0"]["overrides"]["optim.lr"] == 2e-5
    assert named["method=vera,seed=0"]["overrides"]["optim.lr"] == 4e-3
    # STS-B takes 4e-4 wherever the others take the miniature's 1e-3 (MINILM_TASK_LR).
    stsb = runs("study=methods,task=stsb")
    assert load_config(f"{ABLATIONS}:study=methods,task=stsb").base.optim.lr == 4e-4
    assert stsb["method=adapter_h,seed=0"]["overrides"]["optim.lr"] == 4e-4
    assert "optim.lr" not in stsb["method=dora,seed=0"]["overrides"]  # the base's 4e-4
    assert stsb["method=full,seed=0"]["overrides"]["optim.lr"] == 2e-5
    assert stsb["method=vera,seed=0"]["overrides"]["optim.lr"] == 4e-3
    roberta = runs("study=methods,model=roberta-base")
    assert roberta["method=bitfit,seed=0"]["overrides"]["optim.lr"] == 4e-4
    e2e = runs("study=methods,task=e2e,seeds=2")
    assert {r["method"] for r in e2e.values()} == {
        "lora", "full", "top_layers", "adapter_l", "adapter_h", "preembed", "prelayer", "dora",
        "lora_plus"}
    assert len(e2e) == 18


def test_tiny_methods_sweep_tabulates_method_trained_parameters_and_metric(tmp_path):
    argv = tiny_sweep("study=methods,model=tiny", tmp_path, r"method=(lora|bitfit|dora),",
                      "base.train.max_steps=2")
    records = {r["method"]: r for r in sweep.main(argv)}
    assert set(records) == {"lora", "bitfit", "dora"}
    head = 32 * 2 + 2  # tiny BERT's classifier, trained next to every method
    # BitFit: every bias of tiny BERT outside the head (width 32, 2 layers, intermediate 64; the
    # embeddings' LayerNorm and the pooler), then the head whole.
    biases = 2 * (4 * 32 + 64 + 32 + 2 * 32) + 32 + 32
    assert records["bitfit"]["trained_params"] == biases + head
    assert records["lora"]["lora_params"] == 2 * 2 * 8 * (32 + 32)
    assert records["bitfit"]["lora_params"] == 0
    # DoRA (exported in PEFT's format with use_dora) counts its magnitudes too, one per output.
    assert records["dora"]["lora_params"] == records["lora"]["lora_params"]
    assert records["dora"]["trained_params"] == records["lora"]["trained_params"] + 2 * 2 * 32
    table = (tmp_path / "results.md").read_text()
    for method, record in records.items():
        assert f"| {method} |  | 0 | {record['trained_params']} |" in table
    assert (tmp_path / "methods.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("layout", ["run directories", "records directory"])
def test_table2_report_tabulates_medians_per_task_from_finished_records(tmp_path, layout):
    """The report reads each run's record.json (an unfinished sweep reports what it has): per
    method, most parameters first, its trained parameters, per task median [min, max] x100 and
    the seeds; then each method's median wall time per task and each task's total; a figure per
    task."""
    import json

    from experiments import table2_report

    for task, metric, runs in [("sst2", "accuracy", {"lora": (0.8, 0.9, 0.85), "full": (0.7,)}),
                               ("stsb", "pearson", {"lora": (0.5, 0.6)})]:
        for method, bests in runs.items():
            for seed, best in enumerate(bests):
                name = f"method={method},seed={seed}"
                run = tmp_path / "in" / task / name
                path = (run / "record.json" if layout == "run directories"
                        else run.with_name(f"{name}.json"))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({
                    "name": name, "method": method, "targets": "", "rank": 0, "seed": seed,
                    "trained_params": 100 if method == "lora" else 10_000, "lora_params": 0,
                    "metric": metric, "final": best, "best": best, "best_step": 5,
                    "wall_s": 10.0 * (seed + 1),
                    # An older record keeps no `metrics` (STS-B's seed 1 here).
                    **({"metrics": {metric: best, "spearman": best - 0.1, "loss": 2.0 + seed},
                        "metrics_rerun": {"largest_difference": 3e-6, "environments": []}}
                       if task == "stsb" and seed == 0 else {})}))
    (tmp_path / "in" / "cola" / "method=lora,seed=0").mkdir(parents=True)  # not finished
    text = table2_report.main([str(tmp_path / "in"), "--out", str(tmp_path / "out")])
    lines = text.splitlines()
    assert lines[0] == "| method | trained params | sst2 (accuracy) | stsb (pearson) |"
    assert lines[2] == "| full | 10,000 | 70.0 [70.0, 70.0] n=1 | - |"
    assert lines[3] == "| lora | 100 | 85.0 [80.0, 90.0] n=3 | 55.0 [50.0, 60.0] n=2 |"
    written = (tmp_path / "out" / "table.md").read_text()
    assert "(6 finished runs)" in written
    # Walls: full's one run; lora's 10, 20, 30 s on SST-2 (median 20) and 10, 20 on STS-B (15).
    assert "| full | 10 | - |\n| lora | 20 | 15 |\n" in written
    assert "| all runs | 0.02 h (4 runs) | 0.01 h (2 runs) |" in written
    # The other metrics, from the one record that keeps them: Spearman x100, the loss as it is.
    assert ("| method | stsb spearman | stsb loss |\n|---|---|---|\n"
            "| full | - | - |\n| lora | 40.0 [40.0, 40.0] n=1 | 2.000 [2.000, 2.000] n=1 |\n"
            in written)
    # ...and says they came from a rerun that matched only within a tolerance.
    assert ("stsb: 1 records' other metrics are a rerun's, whose pearson differed from the "
            "record's by at most 3.0e-06." in written)
    assert (tmp_path / "out" / "sst2.png").read_bytes()[:4] == b"\x89PNG"
    # A Matthews of -1e-5 prints as 0.0, not -0.0.
    assert table2_report.spread([-1e-5, 0.0, 0.5], 100, 1) == "0.0 [0.0, 50.0]"


def test_together_sweep_records_equal_the_sequential_sweeps(tmp_path, capsys):
    """--together trains runs that share a program as one; each run's record equals the
    sequential sweep's (its metric within 1e-5), and a rerun skips them all."""
    only = r"^rank=(1|4),targets=qv,"
    sequential = {r["name"]: r for r in sweep.main(tiny_sweep("study=rank,model=tiny",
                                                               tmp_path / "seq", only))}
    capsys.readouterr()
    argv = [*tiny_sweep("study=rank,model=tiny", tmp_path / "together", only), "--together"]
    together = {r["name"]: r for r in sweep.main(argv)}
    out = capsys.readouterr().out
    assert out.count("training together:") == 1 and "\ntraining rank" not in out
    assert together.keys() == sequential.keys() and len(together) == 2
    for name, record in sequential.items():
        for key in ("trained_params", "lora_params", "best_step", "metric"):
            assert together[name][key] == record[key], (name, key)
        for key in ("best", "final"):
            np.testing.assert_allclose(together[name][key], record[key], atol=1e-5)
    sweep.main(argv)
    assert capsys.readouterr().out.count("skipping") == 2


def test_backfill_metrics_fills_only_records_a_rerun_reproduced(tmp_path):
    """A rerun that equals its record bit for bit gives the record its `metrics` (the record's
    own wall time stays); a rerun that differs, keeps no metrics, or has no record means
    nothing at all is written."""
    from experiments import backfill_metrics

    def record(seed, final, wall_s, metrics=None):
        return {"name": f"method=lora,seed={seed}", "method": "lora", "targets": "q,v",
                "rank": 8, "seed": seed, "trained_params": 100, "lora_params": 100,
                "metric": "accuracy", "final": final, "best": final, "best_step": 5,
                "wall_s": wall_s, **({"metrics": metrics} if metrics else {})}

    def write(directory, rec):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{rec['name']}.json").write_text(json.dumps(rec, indent=1))

    records, rerun = tmp_path / "records", tmp_path / "rerun"
    for seed in (0, 1):
        write(records, record(seed, (0.7, 0.8)[seed], wall_s=100.0))
    originals = {p.name: p.read_text() for p in records.glob("*.json")}

    f1 = {"accuracy": 0.8, "f1": 0.85, "loss": 0.5}
    write(rerun, record(1, 0.8, wall_s=50.0, metrics=f1))
    write(rerun, record(0, 0.7 + 1e-12, wall_s=50.0, metrics=f1))  # not the same run
    with pytest.raises(ValueError, match=r"seed=0: not reproduced \(final: 0.7 !="):
        backfill_metrics.backfill(rerun, records)
    assert {p.name: p.read_text() for p in records.glob("*.json")} == originals
    # Asked to, it fills the reproduced record and leaves the other as it was, naming it.
    partial = tmp_path / "partial"
    shutil.copytree(records, partial)
    filled, skipped = backfill_metrics.backfill(rerun, partial, skip_unreproduced=True)
    assert filled == ["method=lora,seed=1"] and len(skipped) == 1
    assert skipped[0].startswith("method=lora,seed=0: not reproduced (final: 0.7 != 0.7000")
    assert skipped[0].endswith("; the record does not say where it ran")
    assert (partial / "method=lora,seed=0.json").read_text() == originals["method=lora,seed=0.json"]
    assert json.loads((partial / "method=lora,seed=1.json").read_text())["metrics"] == f1

    write(rerun, record(0, 0.7, wall_s=50.0))  # the same run, but no metrics kept
    with pytest.raises(ValueError, match="seed=0.json: the rerun record keeps no metrics"):
        backfill_metrics.backfill(rerun, records)
    write(rerun, record(2, 0.9, wall_s=50.0, metrics=f1))  # no record to fill
    with pytest.raises(ValueError, match="seed=2.json: no such record"):
        backfill_metrics.backfill(rerun, records)
    assert {p.name: p.read_text() for p in records.glob("*.json")} == originals

    (rerun / "method=lora,seed=2.json").unlink()
    write(rerun, record(0, 0.7, wall_s=50.0, metrics={**f1, "accuracy": 0.7}))
    assert backfill_metrics.backfill(rerun, records) == (
        ["method=lora,seed=0", "method=lora,seed=1"], [])
    for seed, accuracy in [(0, 0.7), (1, 0.8)]:
        filled = json.loads((records / f"method=lora,seed={seed}.json").read_text())
        assert filled == record(seed, accuracy, wall_s=100.0,
                                metrics={**f1, "accuracy": accuracy})
    with pytest.raises(SystemExit, match="backfill_metrics: no rerun records"):
        backfill_metrics.main([str(tmp_path / "empty"), str(records)])


def test_backfill_within_a_tolerance_keeps_the_record_value_and_says_so(tmp_path):
    """A continuous metric rerun elsewhere differs in its last digits: with `within`, a rerun
    whose main metric is that close fills the other metrics, the record keeps its own Pearson,
    and `metrics_rerun` names the difference and where the rerun ran; a rerun farther off, or
    with another best step, still fills nothing; a tolerance the report would show is refused."""
    from experiments import backfill_metrics

    here = environment.describe()

    def record(final, best_step=300, **extra):
        return {"name": "method=lora,seed=0", "method": "lora", "seed": 0,
                "trained_params": 100, "metric": "pearson", "final": final, "best": final,
                "best_step": best_step, "wall_s": 200.0, **extra}

    records, rerun = tmp_path / "records", tmp_path / "rerun"
    records.mkdir(), rerun.mkdir()
    original = json.dumps(record(0.1706262030189458), indent=1)
    (records / "method=lora,seed=0.json").write_text(original)
    metrics = {"pearson": 0.17062630520898878, "spearman": 0.2066, "loss": 2.38}
    close = record(0.17062630520898878, metrics=metrics, environments=[here])

    for far in (record(0.1708, metrics=metrics), record(0.17062630520898878, 250, metrics=metrics)):
        (rerun / "method=lora,seed=0.json").write_text(json.dumps(far))
        with pytest.raises(ValueError, match="not reproduced"):
            backfill_metrics.backfill(rerun, records, within=1e-4)
    (rerun / "method=lora,seed=0.json").write_text(json.dumps(close))
    with pytest.raises(ValueError, match="not reproduced"):  # exact by default
        backfill_metrics.backfill(rerun, records)
    with pytest.raises(ValueError, match="within=0.001"):
        backfill_metrics.backfill(rerun, records, within=1e-3)
    assert (records / "method=lora,seed=0.json").read_text() == original

    assert backfill_metrics.backfill(rerun, records, within=1e-4) == (["method=lora,seed=0"], [])
    got = json.loads((records / "method=lora,seed=0.json").read_text())
    assert got["final"] == got["metrics"]["pearson"] == 0.1706262030189458
    assert got["metrics"]["spearman"] == 0.2066 and got["wall_s"] == 200.0
    assert got["metrics_rerun"]["environments"] == [here]
    assert got["metrics_rerun"]["largest_difference"] == pytest.approx(1.02e-7, rel=0.01)


def test_backfill_names_where_an_unreproduced_record_and_its_rerun_ran():
    """A rerun that differs from its record says whether both ran on the same software and
    machine (then the program changed) or which of those differed (then rounding may have)."""
    from experiments.backfill_metrics import where_each_ran

    here = environment.describe()
    # Another machine's extensions, whatever this one's are (this one may have exactly AVX2).
    avx2 = {**here, "cpu_features": "sse4_2 avx avx2 fma"
            if here["cpu_features"] != "sse4_2 avx avx2 fma" else "sse4_2 avx"}
    assert where_each_ran({"environments": [here]}, {"environments": [here]}) == (
        "same software and machine: the program differs")
    assert where_each_ran({"environments": [avx2]}, {"environments": [here]}) == (
        f"ran elsewhere: cpu_features: {avx2['cpu_features']!r} != {here['cpu_features']!r}")
    assert where_each_ran({"environments": [avx2, here]}, {"environments": [here]}) == (
        "resumed across environments: 2 then, 1 in the rerun")
    assert where_each_ran({}, {"environments": [here]}) == "the record does not say where it ran"
    assert where_each_ran({"environments": [here]}, {}) == "the rerun does not say where it ran"


def test_grid_study_is_rank_by_alpha_on_wq_wv():
    named = runs("study=grid")
    assert len(named) == 16
    assert {(r["rank"], r["alpha"]) for r in named.values()} == {
        (r, a) for r in (4, 8, 16, 32) for a in (16.0, 32.0, 64.0, 128.0)}
    run = named["rank=16,alpha=64,targets=qv,seed=0"]
    assert run["overrides"] == {"method.lora.rank": 16, "method.lora.alpha": 64.0,
                                "method.lora.targets": (Q, V), "seed": 0}
    assert len(runs("study=grid,seeds=2")) == 32


def test_grid_summary_keeps_alpha_apart_and_names_the_best_setting(tmp_path):
    records = [{"name": f"rank={r},alpha={a:g},targets=qv,seed=0", "method": "lora",
                "targets": "qv", "rank": r, "alpha": a, "seed": 0, "trained_params": 10 * r,
                "lora_params": 10 * r, "metric": "accuracy", "best": 0.5 + r / 100 + a / 1000,
                "final": 0.5, "best_step": 4, "wall_s": 1.0}
               for r in (4, 8) for a in (16.0, 128.0)]
    summary = sweep.summarize(records)
    assert [(s["rank"], s["alpha"], s["runs"]) for s in summary] == [
        (4, 16.0, 1), (4, 128.0, 1), (8, 16.0, 1), (8, 128.0, 1)]
    sweep.write_tables(records, tmp_path, "LoRA grid study on sst2")
    text = (tmp_path / "results.md").read_text()
    assert "Best setting: r=8, alpha=128 (alpha/r 16)" in text
    assert "| rank | alpha |" in text
    with open(tmp_path / "results.csv") as f:
        assert [row["alpha"] for row in csv.DictReader(f)] == ["16.0", "128.0", "16.0", "128.0"]
    # A loss (the decoder's dev metric) is best where it is lowest.
    losses = [dict(r, metric="loss") for r in records]
    sweep.write_tables(losses, tmp_path, "LoRA grid study on e2e")
    assert "Best setting: r=4, alpha=16 (alpha/r 4)" in (tmp_path / "results.md").read_text()
    sweep.plot("grid", summary, "accuracy", tmp_path / "grid.png", title="sst2")
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_tiny_grid_sweep_trains_rank_and_alpha_members_together(tmp_path, capsys):
    only = r"^rank=(4|8),alpha=(16|128),"
    argv = [*tiny_sweep("study=grid,model=tiny", tmp_path, only), "--together"]
    records = sweep.main(argv)
    assert capsys.readouterr().out.count("training together:") == 1
    assert [(r["rank"], r["alpha"]) for r in records] == [(4, 16.0), (4, 128.0), (8, 16.0),
                                                           (8, 128.0)]
    # Tiny BERT, q and v: 2 * 2 * r * (32 + 32) LoRA scalars, whatever alpha.
    assert [r["lora_params"] for r in records] == [1024, 1024, 2048, 2048]
    assert len({r["metrics"]["loss"] for r in records}) == 4  # alpha changes what is learned
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
