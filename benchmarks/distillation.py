"""Distillation of the champion: students against their teacher on held-out datasets, and embedding throughput.

Students are made by `metanlp distil` from the teacher (the default pipeline's model, meta-trained on the
embedded corpus), 3 of its 6 layers, on unlabeled text of datasets the suite does not score (WikiText-2, ATIS,
CLINC150, COVID-vaccine intents, 20 Newsgroups, ARSC and the embedded corpus, at most --per-text sentences each),
one student per --hidden-weights value (0: embeddings and their similarities only; >0: each kept layer's token
states pulled toward the teacher's at the layer it came from). Then one `metanlp benchmark` run scores the
frozen encoder, the teacher and every student on the same supports of benchmarks/pools/default_champion.yaml
(SNIPS, airline tweets, AG News, GoEmotions: none trained on by any of them), and each model's encoder embeds
the same texts for throughput (tokenisation excluded, median of --repeats passes), in this process.

    python benchmarks/distillation.py --teacher artifacts/model        # ~40 min on 2 cores (31 distilling)
    python benchmarks/distillation.py --teacher artifacts/model --quick  # tiny budgets: checks the script

Writes benchmarks/results/distillation/{suite.json,suite.md,suite.png,distillation.json,distillation.md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from fewshot_intents import ROOT, SHARED, metanlp
from learners_suite import add_reuse_options

from metanlp.evaluation import mean_ci
from metanlp.suite import compare

UNSCORED_TEXT = ("wikitext2/test.txt", "wikitext2/valid.txt", "atis/train.jsonl", "clinc150/train.jsonl",
                 "covid_vaccine_intents/train.jsonl", "20newsgroups/train.jsonl", "arsc/train.jsonl")
SPEED_TEXT = ("snips", "airline_tweets", "ag_news", "goemotions")  # test texts of the scored datasets


def throughput(model: Path, texts: list[str], repeats: int) -> dict:
    """Texts embedded per second (median of `repeats` passes over the same texts, tokenisation excluded)."""
    import torch

    from metanlp.learners import load_learner

    encoder = load_learner(model).encoder.eval()
    tokens = encoder.tokenize(texts)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        encoder.embed(tokens, batch_size=64)
        seconds.append(time.perf_counter() - started)
    return {"texts_per_s": len(texts) / float(np.median(seconds)), "threads": torch.get_num_threads(),
            "layers": encoder.model.config.num_hidden_layers}


def make_student(args, hidden_weight: float, out: Path) -> float | None:
    """Distil the teacher into `out` unless a student is already there; training seconds when made."""
    if (out / "learner.json").exists():
        return None
    texts = ["default", *[str(SHARED / path) for path in UNSCORED_TEXT if (SHARED / path).exists()]]
    return metanlp(["distil", "--teacher", str(args.teacher), *[a for t in texts for a in ("--text", t)],
                    "--per-text", str(args.per_text), "--steps", str(args.steps), "--hidden-weight",
                    str(hidden_weight), "--out", str(out), "--force", "--quiet"])


def speed_texts(per_dataset: int) -> list[str]:
    texts = []
    for name in SPEED_TEXT:
        lines = (SHARED / name / "test.jsonl").read_text().splitlines()[:per_dataset]
        texts += [json.loads(line)["text"] for line in lines]
    return texts


def per_shots(rows: list[dict], method: str, reference: str) -> dict:
    """method - reference per K over the datasets, paired over support draws (`suite.compare`), with the
    method's mean accuracy there."""
    result = {}
    for entry in compare(rows, method, reference)["mean"]:
        mine = [r["accuracy"] for r in rows if r["method"] == method and r["shots"] == entry["shots"]]
        result[str(entry["shots"])] = {"diff": entry["diff"], "ci95": entry["ci95"], "accuracy": float(np.mean(mine))}
    return result


def over_units(rows: list[dict], method: str, reference: str) -> dict:
    """method - reference over every (dataset, K, draw) unit both scored (Student 95% CI)."""
    given, wanted = ({r["key"]: r["accuracy"] for r in rows if r["method"] == name} for name in (method, reference))
    diff, ci = mean_ci(np.array([given[k] - wanted[k] for k in sorted(given) if k in wanted]), student=True)
    return {"diff": float(diff), "ci95": float(ci), "units": len(given)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=ROOT / "artifacts" / "model")
    parser.add_argument("--hidden-weights", default="1", help="one student per value (1,0: the ablation)")
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--per-text", type=int, default=10000)
    parser.add_argument("--shots", default="5,10")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--max-queries", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per model (the median is kept)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distillation")
    add_reuse_options(parser, "frozen,teacher")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    speed_per_dataset = 250
    datasets = None
    if args.quick:
        args.steps, args.per_text, args.shots, args.draws, args.max_queries, args.repeats = 3, 200, "5", 1, 50, 1
        args.out, speed_per_dataset, datasets = args.out / "quick", 20, "snips,airline_tweets"
    args.out.mkdir(parents=True, exist_ok=True)
    made = args.out / "work"
    students = {f"student_h{w}": (float(w), made / f"student_h{w}") for w in args.hidden_weights.split(",")}
    recorded = made / "train_seconds.json"  # distillation times of students made by an earlier run
    train_seconds = json.loads(recorded.read_text()) if recorded.exists() else {}
    for name, (weight, path) in students.items():
        seconds = make_student(args, weight, path)
        if seconds is not None:
            train_seconds[name] = seconds
            recorded.write_text(json.dumps(train_seconds, indent=2))
    models = {"teacher": args.teacher, **{name: path for name, (_, path) in students.items()}}
    suite = args.out / "suite.json"
    command = ["benchmark", "--pool", str(ROOT / "benchmarks" / "pools" / "default_champion.yaml"),
               "--methods", "frozen", "--no-model-logreg", "--shots", args.shots, "--draws", str(args.draws),
               "--max-queries", str(args.max_queries), "--out", str(suite), "--quiet"]
    command += [a for name, path in models.items() for a in ("--model", f"{name}={path}")]
    if datasets:
        command += ["--datasets", datasets]
    if args.reuse:
        command += ["--reuse", str(args.reuse), "--reuse-methods", args.reuse_methods]
    metanlp(command)
    texts = speed_texts(speed_per_dataset)
    speed = {name: throughput(path, texts, args.repeats) for name, path in models.items()}
    shots = sorted(int(k) for k in args.shots.split(","))
    # Only the asked K: a dataset's own protocol (airline tweets' 16 shots) would be a mean over one dataset.
    rows = [r for r in json.loads(suite.read_text())["rows"] if r["shots"] in shots]
    result = {"teacher": str(args.teacher), "speed_texts": len(texts), "speed": speed,
              "train_seconds": train_seconds, "config": {k: str(v) for k, v in vars(args).items()},
              "models": {}}
    for name in models:
        result["models"][name] = {
            "vs_teacher": per_shots(rows, name, "teacher"),
            "vs_teacher_all_units": over_units(rows, name, "teacher"),
            "vs_frozen": per_shots(rows, name, "frozen"),
            "speed_up": speed[name]["texts_per_s"] / speed["teacher"]["texts_per_s"]}
    (args.out / "distillation.json").write_text(json.dumps(result, indent=2))
    write_table(args, result, shots)


def write_table(args, result: dict, shots: list[int]) -> None:
    speed = result["speed"]
    lines = [f"`python benchmarks/distillation.py --teacher {args.teacher}`: held-out datasets of "
             "benchmarks/pools/default_champion.yaml, same supports for every row; accuracy is the mean over "
             "datasets; Δ paired over support draws (Student 95% CI); throughput on the same "
             f"{result['speed_texts']} test texts, {speed['teacher']['threads']} threads, tokenisation excluded.\n",
             "| model | layers | texts/s | speed-up | "
             + " | ".join(f"K={k} accuracy % | K={k} Δ vs teacher, pp | K={k} Δ vs frozen, pp" for k in shots)
             + " | distil s |", "|---|---|---|---|" + "---|---|---|" * len(shots) + "---|"]
    for name, entry in result["models"].items():
        cells = []
        for k in map(str, shots):
            teacher, frozen = entry["vs_teacher"][k], entry["vs_frozen"][k]
            versus = "—" if name == "teacher" else f"{100 * teacher['diff']:+.1f} ± {100 * teacher['ci95']:.1f}"
            cells += [f"{100 * teacher['accuracy']:.1f}", versus,
                      f"{100 * frozen['diff']:+.1f} ± {100 * frozen['ci95']:.1f}"]
        trained = result["train_seconds"].get(name)
        seconds = f"{trained:.0f}" if trained else "—"
        lines.append(f"| {name} | {speed[name]['layers']} | {speed[name]['texts_per_s']:.0f} | "
                     f"{entry['speed_up']:.2f}x | " + " | ".join(cells) + f" | {seconds} |")
    lines.append("")
    for name, entry in result["models"].items():
        if name != "teacher":
            every = entry["vs_teacher_all_units"]
            lines.append(f"- {name}: {entry['speed_up']:.2f}x the teacher's throughput, "
                         f"{100 * every['diff']:+.1f} ± {100 * every['ci95']:.1f} pp over {every['units']} "
                         "(dataset, K, draw) units.")
    (args.out / "distillation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
