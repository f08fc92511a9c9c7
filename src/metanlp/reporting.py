"""Results -> what people read: markdown tables and plots of evaluations, the learning curve of a training run.

Everything here reads plain results (the JSON-ready dicts of `evaluation` and the training history); it
computes nothing a decision depends on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from metanlp.evaluation import BASELINE


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def percent(value: float | None) -> str:
    """A fraction as a percentage with one decimal; 'n/a' for a missing or NaN value."""
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def gain(diff: float, ci95: float | None) -> str:
    """A paired difference in percentage points with its 95% CI: '+2.6 ± 0.6'."""
    return f"{100 * diff:+.1f} ± {percent(ci95)}"


def markdown_table(results: dict) -> str:
    """One row per setting and method; the adaptation time column only when the results carry timings (the
    pipeline keeps them apart, in its run record)."""
    timed = any("adapt_ms" in m for entry in results["settings"] for m in entry["methods"].values())
    ms_header, ms_rule = (" adapt ms/episode |", "---|") if timed else ("", "")
    lines = [f"| setting | method | accuracy % (95% CI) | Δ vs frozen, pp (95% CI) |{ms_header} episodes |",
             f"|---|---|---|---|{ms_rule}---|"]
    for entry in results["settings"]:
        for name, m in entry["methods"].items():
            diff = "—" if name == BASELINE or "diff_vs_frozen" not in m else gain(m["diff_vs_frozen"],
                                                                                  m["diff_ci95"])
            ms = f" {m['adapt_ms']:.0f} |" if timed else ""
            lines.append(f"| {entry['setting']} | {name} | {percent(m['accuracy'])} ± {percent(m['ci95'])} | {diff} |"
                         f"{ms} {m['episodes']} |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_shots(results: dict, path: Path, title: str = "") -> Path:
    plt = _pyplot()
    groups: dict[str, dict[str, list]] = {}
    for entry in results["settings"]:  # one panel per dataset and ways, so a line never joins two datasets
        ways = "all-way" if entry["ways"] == "all" else f"{entry['ways']}-way"
        panel = f"{entry['dataset']}: {ways}" if "dataset" in entry else f"{title} {ways}".strip()
        for name, m in entry["methods"].items():
            groups.setdefault(panel, {}).setdefault(name, []).append((entry["shots"], m["accuracy"], m["ci95"]))
    columns = min(4, len(groups))
    rows = math.ceil(len(groups) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, (panel, methods) in zip(axes.flat, groups.items(), strict=False):
        for name, points in methods.items():
            points.sort()
            shots, acc, ci = zip(*points, strict=True)
            ax.errorbar(shots, [100 * a for a in acc], yerr=[0 if math.isnan(c) else 100 * c for c in ci],
                        marker="o", capsize=3, label=name)
        ax.set(title=panel, xlabel="shots per class", ylabel="accuracy %")
        ax.set_xticks(sorted({p[0] for pts in methods.values() for p in pts}))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: dict, out: Path, title: str = "") -> dict[str, Path]:
    """results.json, results.md and results.png side by side."""
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = out.with_suffix(".json"), out.with_suffix(".md"), out.with_suffix(".png")
    json_path.write_text(json.dumps(results, indent=2))
    md_path.write_text(markdown_table(results))
    plot_accuracy_vs_shots(results, png_path, title)
    return {"json": json_path, "markdown": md_path, "plot": png_path}


def plot_learning_curve(history: list[dict], best_episode: int, path: Path) -> Path:
    """Validation accuracy (with its CI) over meta-training, the kept checkpoint marked."""
    plt = _pyplot()
    episodes = [h["episode"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(episodes, [100 * h["val_accuracy"] for h in history],
                yerr=[100 * h["val_ci95"] for h in history], marker="o", capsize=3, label="val accuracy")
    ax.axvline(best_episode, color="grey", linestyle="--", label="best checkpoint")
    ax.set(xlabel="meta-training episode", ylabel="validation accuracy %", title="meta-training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_training_report(model_dir: Path) -> Path:
    """learning_curve.png beside a saved model, from the history.json training wrote there."""
    record = json.loads((Path(model_dir) / "history.json").read_text())
    return plot_learning_curve(record["history"], record["best_episode"], Path(model_dir) / "learning_curve.png")


def _cell(value: dict | None) -> str:
    if not value:
        return "—"
    return gain(value["diff"], value["ci95"])


def suite_markdown(results: dict) -> str:
    """The suite's tables: per dataset and K, then the mean over datasets per K."""
    summary, notes = results["summary"], results.get("notes", [])
    lines = ["| dataset | K | method | accuracy % (95% CI) | Δ vs frozen, pp | Δ vs SetFit, pp | adapt s "
             "| classes (short) |", "|---|---|---|---|---|---|---|---|"]
    for entry in summary["datasets"]:
        for name, m in entry["methods"].items():
            reused = " (reused)" if m.get("reused") else ""
            lines.append(f"| {entry['dataset']} | {entry['shots']} | {name}{reused} | {percent(m['accuracy'])} ± "
                         f"{percent(m['ci95'])} | {_cell(m.get('vs_frozen'))} | {_cell(m.get('vs_setfit'))} | "
                         f"{m['adapt_s']:.2f} | {m['classes']} ({m['short_classes']}) |")
    lines += ["", "| K | method | mean accuracy % over datasets (95% CI over draws) | Δ vs frozen, pp | "
              "Δ vs SetFit, pp | adapt s |", "|---|---|---|---|---|---|"]
    for entry in summary["mean"]:
        for name, m in entry["methods"].items():
            lines.append(f"| {entry['shots']} | {name} | {percent(m['accuracy'])} ± {percent(m['ci95'])} | "
                         f"{_cell(m.get('vs_frozen'))} | {_cell(m.get('vs_setfit'))} | {m['adapt_s']:.2f} |")
    return "\n".join(lines + [""] + [f"- {note}" for note in notes]) + "\n"


def plot_suite(results: dict, path: Path) -> Path:
    """Accuracy per dataset and method (one panel per K), and mean accuracy against adaptation seconds."""
    plt = _pyplot()
    summary = results["summary"]
    shots = sorted({e["shots"] for e in summary["datasets"]})
    fig, axes = plt.subplots(1, len(shots) + 1, figsize=(6 * (len(shots) + 1), 4.5), squeeze=False)
    for ax, k in zip(axes[0], shots, strict=False):
        entries = [e for e in summary["datasets"] if e["shots"] == k]
        methods = list(dict.fromkeys(m for e in entries for m in e["methods"]))
        width = 0.8 / max(len(methods), 1)
        for i, method in enumerate(methods):
            xs = [j + i * width for j, e in enumerate(entries) if method in e["methods"]]
            ys = [100 * e["methods"][method]["accuracy"] for e in entries if method in e["methods"]]
            ax.bar(xs, ys, width, label=method)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(entries))], [e["dataset"] for e in entries],
                      rotation=30, ha="right")
        ax.set(title=f"K = {k}", ylabel="accuracy %")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    ax = axes[0][-1]
    for entry in summary["mean"]:
        for method, m in entry["methods"].items():
            ax.scatter(max(m["adapt_s"], 1e-3), 100 * m["accuracy"], label=f"{method} K={entry['shots']}")
            ax.annotate(f"{method} K={entry['shots']}", (max(m["adapt_s"], 1e-3), 100 * m["accuracy"]), fontsize=7)
    ax.set(xscale="log", xlabel="adaptation seconds per support set (log)", ylabel="mean accuracy %",
           title="accuracy against adaptation time")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_suite_report(results: dict, out: Path) -> dict[str, Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {"json": out.with_suffix(".json"), "markdown": out.with_suffix(".md"), "plot": out.with_suffix(".png")}
    paths["json"].write_text(json.dumps(results, indent=1))
    paths["markdown"].write_text(suite_markdown(results))
    plot_suite(results, paths["plot"])
    return paths
