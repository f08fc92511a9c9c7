"""Raw corpus -> validation report (artifacts/validation/report.{json,md}): the rules of
`metanlp.data.validation` must pass before any training. A failure raises `CorpusInvalid` naming each failed
expectation with counts and a few offending rows; the report is written either way.
"""

from __future__ import annotations

from pathlib import Path

from metanlp.atomic import write_text_atomic
from metanlp.config import PipelineParams
from metanlp.data.validation import CorpusInvalid, markdown_report, validate_corpus
from metanlp.stages.common import Stage, Workspace, corpus_file, write_json

REPORT = "artifacts/validation/report.json"


def run(params: PipelineParams, root: Path) -> dict:
    workspace = Workspace(root)
    report = validate_corpus(workspace.source(params), params.validate_, params.data.split,
                             params.min_examples_per_class(), name=params.data.corpus)
    write_json(root / REPORT, report)
    write_text_atomic(root / REPORT.replace(".json", ".md"), markdown_report(report))
    if not report["success"]:
        raise CorpusInvalid(report)
    return {"report": str(root / REPORT), "rows": report["rows"], "classes": report["classes"]}


STAGE = Stage(name="validate", run=run, params=("data", "validate", "meta_train.train.episode", "evaluate.shots",
                                                "evaluate.queries"),
              deps=("data",), outs=("artifacts/validation",), done=(REPORT,),
              inputs=corpus_file)
