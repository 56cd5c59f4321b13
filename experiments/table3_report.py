"""Table 3 in miniature: the table and figures, from the runs' records, so an unfinished run of
`experiments/table3.sh` reports what it has.

    python -m experiments.table3_report experiments/results/table3/records \
        --out experiments/results/table3

Writes into OUT:
  table.md          per row (the paper's order): trained parameters, the five E2E metrics as the
                    median [min, max] over seeds (BLEU, METEOR, ROUGE-L x100, as the paper
                    prints them), forgetting (held-out loss after minus before, nats per token),
                    intruder dimensions (top-10, epsilon 0.5; summed over the block matrices),
                    train and decode time (wall, and CPU on both cores), peak memory of each
                    phase; then the settings; then the rows the paper's Table 3 also has,
                    each metric ours beside the paper's (GPT-2 M).
  gain_vs_forgetting.png  BLEU against forgetting, a point per run (Biderman et al. 2024's
                    picture): up is better learning, right is more forgetting.
  intruders.png     intruder dimensions per block, per row that counts them (median over seeds).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
from collections.abc import Sequence

from experiments import sweep
from lora_jax.analysis.intruders import per_layer

ROW_ORDER = ("zero_shot", "full", "lora", "lora_all", "qlora", "qlora_gguf", "dora", "adapter_l",
             "adapter_h", "prelayer", "preembed")
ROW_NAMES = {"zero_shot": "zero-shot (chat template)", "full": "FT", "lora": "LoRA (Wq, Wv, r=4)",
             "lora_all": "LoRA (all linear, r=8)", "qlora": "QLoRA (all linear, r=8, nf4)",
             "qlora_gguf": "LoRA over GGUF Q4_1 (all linear, r=8)", "dora": "DoRA (Wq, Wv, r=4)",
             "adapter_l": "Adapter^L", "adapter_h": "Adapter^H", "prelayer": "PreLayer",
             "preembed": "PreEmbed"}
METRICS = (("BLEU", 100.0), ("NIST", 1.0), ("METEOR", 100.0), ("ROUGE_L", 100.0), ("CIDEr", 1.0))
METRIC_HEADER = [name.replace("_", "-") for name, _ in METRICS]
GIB = 2.0 ** 30
# The paper's Table 3 on GPT-2 M (5 epochs of E2E, beam 10; the mean where it gives 3 seeds), for
# the rows it shares with ours: trained parameters, then the METRICS as it prints them. Its
# Adapter^L row here is the 0.37M one, the budget ours matches (bottleneck 6, LoRA's size).
PAPER_GPT2_M = {
    "full": ("354.92M", (68.2, 8.62, 46.2, 71.0, 2.47)),
    "lora": ("0.35M", (70.4, 8.85, 46.8, 71.8, 2.53)),
    "adapter_l": ("0.37M", (66.3, 8.41, 45.0, 69.8, 2.40)),
    "adapter_h": ("11.09M", (67.3, 8.50, 46.0, 70.7, 2.44)),
    "prelayer": ("0.35M", (69.7, 8.81, 46.1, 71.4, 2.49)),
}


def read_records(root: pathlib.Path) -> dict[str, list[dict]]:
    """Row -> its records (ROOT/<name>.json), seeds in order, rows in the paper's order."""
    rows: dict[str, list[dict]] = {}
    for path in sorted(root.glob("*.json")):
        record = json.loads(path.read_text())
        rows.setdefault(record["method"], []).append(record)
    order = list(ROW_ORDER) + sorted(set(rows) - set(ROW_ORDER))
    return {row: sorted(rows[row], key=lambda r: r["seed"]) for row in order if row in rows}


def spread(values: Sequence[float], digits: int) -> str:
    """'median [min, max]' (one value: itself)."""
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def minutes(wall_s: Sequence[float], cpu_s: Sequence[float | None],
            resumed: bool = False) -> str:
    """'12.3 (CPU 23.9)': median wall and CPU minutes ('*': a run resumed, its wall time only
    the resumed part's); CPU time, on both cores, does not grow while another job holds them."""
    text = f"{statistics.median(wall_s) / 60:.1f}"
    cpu = [c for c in cpu_s if c is not None]
    if cpu:
        text += f" (CPU {statistics.median(cpu) / 60:.1f})"
    return text + ("*" if resumed else "")


def intruder_total(record: dict) -> int | None:
    return sum(record["intruders"].values()) if "intruders" in record else None


def markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """The sweep's Markdown table, of rows given as cells under `header`."""
    return sweep.markdown_table([dict(zip(header, cells, strict=True)) for cells in body], header)


def digits(scale: float) -> int:
    """Decimals a metric is printed with: 2 for NIST and CIDEr, 1 for the x100 ones."""
    return 2 if scale == 1.0 else 1


def table(rows: dict[str, list[dict]]) -> str:
    """The table (see the module docstring)."""
    header = (["row", "trained params", "seeds"] + METRIC_HEADER
              + ["forgetting", "intruders", "train min", "decode min",
                 "peak RSS train / decode"])
    body = []
    for row, records in rows.items():
        cells = [ROW_NAMES.get(row, row), f"{records[0]['trained_params']:,}", str(len(records))]
        for name, scale in METRICS:
            cells.append(spread([r["scores"][name] * scale for r in records], digits(scale)))
        cells.append(spread([r["forgetting"] for r in records], 4))
        counts = [c for c in map(intruder_total, records) if c is not None]
        cells.append(spread(counts, 0) if counts else "-")
        cells.append(minutes([r["train_wall_s"] for r in records],
                             [r.get("train_cpu_s") for r in records],
                             any(r.get("train_resumed") for r in records))
                     if records[0]["steps"] else "-")
        cells.append(minutes([r["decode_s"] for r in records],
                             [r.get("decode_cpu_s") for r in records]))
        train_rss = [r["train_peak_rss_bytes"] for r in records if r["train_peak_rss_bytes"]]
        cells.append((f"{max(train_rss) / GIB:.2f}" if train_rss else "-")
                     + f" / {max(r['score_peak_rss_bytes'] for r in records) / GIB:.2f} GiB")
        body.append(cells)
    return markdown(header, body)


def beside_the_paper(rows: dict[str, list[dict]]) -> str:
    """The rows the paper's Table 3 has: each metric's median over our seeds / the paper's."""
    body = []
    for row, records in rows.items():
        if row not in PAPER_GPT2_M:
            continue
        trained, paper = PAPER_GPT2_M[row]
        cells = [ROW_NAMES.get(row, row), f"{records[0]['trained_params'] / 1e6:.2f}M / {trained}"]
        for (name, scale), theirs in zip(METRICS, paper, strict=True):
            ours = statistics.median(r["scores"][name] * scale for r in records)
            cells.append(f"{ours:.{digits(scale)}f} / {theirs:.{digits(scale)}f}")
        body.append(cells)
    return markdown(["row", "trained params"] + METRIC_HEADER, body)


def settings(rows: dict[str, list[dict]]) -> str:
    first = next(iter(rows.values()))[0]
    steps = sorted({r["steps"] for records in rows.values() for r in records if r["steps"]})
    return (f"Split: {first['split']} ({first['outputs']} MRs); beam {first['beam']}; "
            f"training steps {', '.join(map(str, steps)) or '-'} at batch {first['batch_size']}; "
            f"held-out text: {first['heldout']['tokens']:,} predicted tokens.")


def plot_gain_vs_forgetting(rows: dict[str, list[dict]], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    markers = "osD^vP*Xhp<>"
    for i, (row, records) in enumerate(rows.items()):
        ax.scatter([r["forgetting"] for r in records],
                   [100 * r["scores"]["BLEU"] for r in records], marker=markers[i % len(markers)],
                   label=ROW_NAMES.get(row, row))
    ax.axvline(0.0, color="grey", lw=0.5)
    ax.set_xlabel("forgetting: held-out loss after - before (nats / token)")
    ax.set_ylabel("test BLEU")
    ax.set_title("Gain against forgetting (one point per run)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_intruders(rows: dict[str, list[dict]], path: pathlib.Path) -> bool:
    """Per block, the median over seeds of the intruders summed over its matrices; False when
    no record counts them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counted = {row: [per_layer(r["intruders"]) for r in records if "intruders" in r]
               for row, records in rows.items()}
    counted = {row: layers for row, layers in counted.items() if layers}
    if not counted:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for row, layers in counted.items():
        blocks = sorted(layers[0])
        ax.plot(blocks, [statistics.median(c[b] for c in layers) for b in blocks], marker="o",
                ms=3, label=ROW_NAMES.get(row, row))
    ax.set_xlabel("block")
    ax.set_ylabel("intruder dimensions (top 10, eps 0.5)")
    ax.set_title("Intruder dimensions per block, summed over its matrices")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def report(root: pathlib.Path, out: pathlib.Path) -> str:
    """Writes table.md and the figures; returns the table's text."""
    rows = read_records(root)
    if not rows:
        raise SystemExit(f"{root} holds no record (<name>.json): nothing to report")
    out.mkdir(parents=True, exist_ok=True)
    text = (f"# Table 3 in miniature: E2E NLG on SmolLM2-135M-Instruct\n\n"
            f"Built by `python -m experiments.table3_report {root} --out {out}` from the records "
            f"`bash experiments/table3.sh` writes.\n\n{table(rows)}\n\n{settings(rows)}\n\n"
            f"## Beside the paper's Table 3\n\nOurs (SmolLM2-135M-Instruct, 100 steps, beam 2; "
            f"the median over seeds) / the paper's (GPT-2 M, 354.92M parameters: 5 epochs, beam "
            f"10), for the rows both have.\n\n{beside_the_paper(rows)}\n")
    (out / "table.md").write_text(text)
    plot_gain_vs_forgetting(rows, out / "gain_vs_forgetting.png")
    plot_intruders(rows, out / "intruders.png")
    return text


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", type=pathlib.Path, help="the records directory")
    parser.add_argument("--out", required=True, type=pathlib.Path)
    args = parser.parse_args(argv)
    print(report(args.records, args.out))


if __name__ == "__main__":
    main()
