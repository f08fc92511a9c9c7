"""Ablation: each component on and off, on the same supports, from `metanlp benchmark` results (one run or
several runs of the same pool and seed, e.g. one with SetFit on the small sets and one without it).

    python benchmarks/ablation.py --results benchmarks/results/fine_grained/fine_grained.json \\
        --compare champion:frozen --compare champion+contrastive:champion --out benchmarks/results/fine_grained/ablation

Each --compare ON:OFF is a column: ON minus OFF, pp, paired over support draws (95% Student CI), per dataset and
K and for the mean over the datasets both ran; the seconds are each one's mean adaptation time per support set.
Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metanlp.reporting import gain
from metanlp.suite import compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", action="append", required=True,
                        help="a suite JSON (repeatable); FILE@TAG names its methods METHOD@TAG, to compare a method "
                             "with itself in an earlier run of the same supports (e.g. before a change)")
    parser.add_argument("--compare", action="append", required=True, help="ON:OFF method names (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="path without suffix: .json and .md are written")
    args = parser.parse_args()
    rows = [row for item in args.results for row in tagged_rows(item)]
    methods = {r["method"] for r in rows}
    pairs = []
    for item in args.compare:
        on, _, off = item.partition(":")
        unknown = sorted({on, off} - methods)
        if unknown:
            parser.error(f"--compare {item}: no rows of {unknown}; the results hold {sorted(methods)}")
        pairs.append((on, off))
    comparisons = [compare(rows, on, off) for on, off in pairs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"results": args.results,
                                                         "comparisons": comparisons}, indent=2))
    text = markdown(comparisons)
    args.out.with_suffix(".md").write_text(text)
    print(text)


def tagged_rows(item: str) -> list[dict]:
    """The rows of a suite JSON given as FILE or FILE@TAG (then every method is renamed METHOD@TAG)."""
    path, _, tag = item.partition("@")
    rows = json.loads(Path(path).read_text())["rows"]
    return [{**row, "method": f"{row['method']}@{tag}"} for row in rows] if tag else rows


def markdown(comparisons: list[dict]) -> str:
    header = "| dataset | K | " + " | ".join(f"{c['method']} − {c['baseline']}, pp (s vs s)" for c in comparisons)
    lines = [header + " |", "|---|---|" + "---|" * len(comparisons)]
    keys = sorted({(e["dataset"], e["shots"]) for c in comparisons for e in c["datasets"]})
    means = sorted({e["shots"] for c in comparisons for e in c["mean"]})

    def cell(entry):
        if entry is None:
            return "—"
        return f"{gain(entry['diff'], entry['ci95'])} ({entry['adapt_s']:.1f} vs {entry['baseline_adapt_s']:.1f})"

    for dataset, shots in keys:
        found = [next((e for e in c["datasets"] if (e["dataset"], e["shots"]) == (dataset, shots)), None)
                 for c in comparisons]
        lines.append(f"| {dataset} | {shots} | " + " | ".join(cell(e) for e in found) + " |")
    for shots in means:
        found = [next((e for e in c["mean"] if e["shots"] == shots), None) for c in comparisons]
        lines.append(f"| **mean** | {shots} | " + " | ".join(cell(e) for e in found) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
