"""Evaluation + registry outcome -> the run's closing summary (artifacts/summary.md, also in the MLflow run):
each evaluation setting with the model against the frozen encoder (95% CIs, paired gain, adaptation ms), what
the registry did and why, where the model and the run are, and the commands to use the model next.

The summary names this run's MLflow run, paths and timings, so it is a run record (git-ignored), not a DVC
output: the stage reruns when the results or the registry's decision change."""

from __future__ import annotations

from pathlib import Path

from metanlp.atomic import write_text_atomic
from metanlp.config import PipelineParams
from metanlp.evaluation import BASELINE
from metanlp.reporting import gain, percent
from metanlp.stages.common import Stage, read_json
from metanlp.stages.evaluate import NAMES_BASELINE, POOLED, RESULTS, read_timings
from metanlp.stages.meta_train import MODEL
from metanlp.stages.register import RECORD, RUN
from metanlp.tracking import tracking

SUMMARY = "artifacts/summary.md"


def paired_gain(method: dict) -> str:
    return gain(method["diff_vs_frozen"], method["diff_ci95"]) if "diff_vs_frozen" in method else "n/a"


HELD_OUT = {None: "the test classes, and each dataset evaluate.datasets names",
            POOLED: "the task pool's eval datasets, pooled and each alone, and their mean"}


def summary_text(results: dict, record: dict, root: Path, timings: dict | None = None) -> str:
    """The summary, made from the run's own results (nothing here is measured again). `record`: registry.json
    with the register stage's run record (run id, tracking URI); `timings`: the evaluate stage's run record."""
    timings = timings or {}
    learner = results["learner"]
    named = any(NAMES_BASELINE in entry["methods"] for entry in results["settings"])
    names_header = f" {NAMES_BASELINE} % (95% CI) | its gain over frozen, pp |" if named else ""
    lines = ["# metanlp run summary", "",
             f"Model `{learner}` evaluated on data it never meta-trained on ({HELD_OUT[results.get('test_data')]}), "
             "same episodes for every method:", "",
             f"| data | setting | {learner} % (95% CI) | frozen % (95% CI) | paired gain, pp (95% CI) | adapt ms |"
             + names_header, "|---|---|---|---|---|---|" + ("---|---|" if named else "")]
    for entry in results["settings"]:
        mine, base = entry["methods"][learner], entry["methods"].get(BASELINE, {})
        data = entry.get("dataset", results.get("test_data", "test classes"))
        setting = entry["setting"].split(": ")[-1]
        row = (f"| {data} | {setting} | {percent(mine['accuracy'])} ± {percent(mine['ci95'])} | "
               f"{percent(base.get('accuracy'))} ± {percent(base.get('ci95'))} | {paired_gain(mine)} | "
               f"{adapt_ms(timings, entry['setting'], learner)} |")
        if named:
            names = entry["methods"].get(NAMES_BASELINE, {})
            row += (f" {percent(names.get('accuracy'))} ± {percent(names.get('ci95'))} | {paired_gain(names)} |")
        lines.append(row)
    name, version = record["model_name"], record["version"]
    champion = "champion" if record["promoted"] else f"challenger (champion stays v{record['champion_version']})"
    uri = record["tracking_uri"]
    lines += ["", f"Registry: `{name}` v{version} is {champion}: {record['reason']}.",
              f"Model folder: `{root / MODEL}`; MLflow run `{record['run_id']}` at `{uri}`.", "", "Next:", "",
              "```bash",
              f"metanlp predict --model {root / MODEL} --support my_examples.csv --text \"a new text to label\"",
              f"mlflow ui --backend-store-uri {uri}",
              f"metanlp serve --model models:/{name}@champion --tracking-uri {uri}",
              f"MLFLOW_TRACKING_URI={uri} mlflow models serve -m models:/{name}@champion --env-manager local -p 5001",
              "```", ""]
    return "\n".join(lines)


def adapt_ms(timings: dict, setting: str, method: str) -> str:
    value = timings.get(setting, {}).get(method, {}).get("adapt_ms")
    return "n/a" if value is None else f"{value:.0f}"


def run(params: PipelineParams, root: Path) -> dict:
    import mlflow

    results = read_json(root / RESULTS, "evaluate")
    record = read_json(root / RECORD, "register") | read_json(root / RUN, "register")
    text = summary_text(results, record, root, read_timings(root))
    write_text_atomic(root / SUMMARY, text)
    reg = params.register_
    with tracking(reg.tracking_uri, root, reg.experiment):
        mlflow.MlflowClient().log_artifact(record["run_id"], str(root / SUMMARY))
    return {"summary": str(root / SUMMARY), "text": text}


STAGE = Stage(name="summary", run=run, params=("register",), deps=(RESULTS, RECORD), outs=(), done=(SUMMARY,),
              tracks=True, records=(SUMMARY,))
