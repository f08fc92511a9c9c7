"""Raw corpus -> validation report (artifacts/validation/report.{json,md}): the rules of
`metanlp.data.validation` must pass before any training. A failure raises `CorpusInvalid` naming each failed
expectation with counts and a few offending rows; the report is written either way.
"""

from __future__ import annotations

from pathlib import Path

from metanlp.atomic import write_text_atomic
from metanlp.config import PipelineParams
from metanlp.data.validation import CorpusInvalid, markdown_report, validate_corpus, validate_pool
from metanlp.stages.common import Stage, Workspace, corpus_file, eval_dataset_files, write_json

REPORT = "artifacts/validation/report.json"


def run(params: PipelineParams, root: Path) -> dict:
    workspace = Workspace(root)
    if params.data.pool is not None:  # evaluate.datasets as eval entries: the same rules, `held_out` included
        report = validate_pool(params.checked_pool(), root, params.validate_, params.min_examples_per_class())
        if report["success"]:  # the loader's rules on evaluate.datasets too; their lines keep the pool's facts
            for name, loaded in held_out_datasets(params, root, None).items():
                report["datasets"][name] |= loaded
    else:
        report = validate_corpus(workspace.source(params), params.validate_, params.data.split,
                                 params.min_examples_per_class(), name=params.data.corpus)
        if report["success"]:
            report["datasets"] = held_out_datasets(params, root, workspace.source(params))
    write_json(root / REPORT, report)
    write_text_atomic(root / REPORT.replace(".json", ".md"), markdown_report(report))
    if not report["success"]:
        raise CorpusInvalid(report)
    return {"report": str(root / REPORT), "rows": report["rows"], "classes": report["classes"]}


def held_out_datasets(params: PipelineParams, root: Path, source: Path | None) -> dict[str, dict]:
    """Every dataset evaluate.datasets names loads under the loader's rules, has label spaces of 2+ classes,
    and shares no class with the corpus's training or validation split (else a DataError names it). With a
    task pool (`source` None) the pool's `held_out` rule checks that instead (`PipelineParams.checked_pool`)."""
    from metanlp.data.load import load_labelled
    from metanlp.data.pool import load_held_out
    from metanlp.data.splits import split_classes

    if not params.evaluate.datasets:
        return {}
    seen = set()
    if source is not None:
        split = split_classes(load_labelled(source), params.data.split)
        seen = set(split.train) | set(split.val)
    out = {}
    for entry in params.evaluate.datasets:
        data = load_held_out(entry, root, seen, source)
        out[entry.name] = {"rows": len(data), "classes": len(data.classes), "label_spaces": len(set(data.domains))}
    return out


def inputs(params: PipelineParams, root: Path) -> list[Path]:
    return corpus_file(params, root) + eval_dataset_files(params, root)


STAGE = Stage(name="validate", run=run, params=("data", "validate", "meta_train.train.episode", "evaluate.shots",
                                                "evaluate.queries", "evaluate.datasets"),
              deps=("data",), outs=("artifacts/validation",), done=(REPORT,),
              inputs=inputs)
