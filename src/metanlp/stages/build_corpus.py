"""Validated raw corpus -> class-disjoint corpus files: artifacts/corpus/{train,val,test}.jsonl + manifest.json.

The manifest records the source's md5 and the classes of each split; later stages read only these files,
so what was trained and evaluated on is exactly what DVC versioned.
"""

from __future__ import annotations

import json
from pathlib import Path

from metanlp.atomic import file_digest
from metanlp.config import PipelineParams
from metanlp.data.load import LabelledTexts, load_labelled
from metanlp.data.splits import SPLIT_NAMES, split_classes
from metanlp.stages.common import Stage, StageError, Workspace, corpus_file, read_json, write_json
from metanlp.stages.validate import REPORT

CORPUS = "artifacts/corpus"
MANIFEST = f"{CORPUS}/manifest.json"


def write_labelled(data: LabelledTexts, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for i, (text, label) in enumerate(zip(data.texts, data.labels, strict=True)):
            row = {"text": text, "label": label}
            if data.domains is not None:
                row["domain"] = data.domains[i]
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def run(params: PipelineParams, root: Path) -> dict:
    source = Workspace(root).source(params)
    report = read_json(root / REPORT, "validate")
    if not report["success"] or report["source"] != params.data.corpus:
        raise StageError(f"{source}: has no passing validation report; run the validate stage first")
    corpus = load_labelled(source)
    split = split_classes(corpus, params.data.split)
    manifest = {"source": params.data.corpus, "source_md5": file_digest(source), "rows": {}, "classes": {}}
    for name in SPLIT_NAMES:
        part = corpus.with_classes(split.classes(name))
        write_labelled(part, root / CORPUS / f"{name}.jsonl")
        manifest["rows"][name], manifest["classes"][name] = len(part), split.classes(name)
    write_json(root / MANIFEST, manifest)
    return {"manifest": str(root / MANIFEST), "rows": manifest["rows"]}


def load_split(root: Path, name: str) -> LabelledTexts:
    path = root / CORPUS / f"{name}.jsonl"
    if not path.exists():
        raise StageError(f"{path}: missing; run the build_corpus stage first")
    return load_labelled(path)


STAGE = Stage(name="build_corpus", run=run, params=("data",), deps=("data", REPORT), outs=(CORPUS,),
              done=(MANIFEST,), inputs=corpus_file)
