"""Validated raw corpus -> class-disjoint corpus files: artifacts/corpus/{train,val,test}.jsonl + manifest.json.
With a task pool (data.tasks) the files hold its meta_train, meta_val and eval datasets' label spaces.

The manifest records the source's md5 and the classes of each split; later stages read only these files,
so what was trained and evaluated on is exactly what DVC versioned.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from metanlp.atomic import file_digest
from metanlp.config import PipelineParams, TaskPool
from metanlp.data.load import LabelledTexts, default_corpus_path, load_labelled
from metanlp.data.pool import ROLE_SPLITS
from metanlp.data.splits import SPLIT_NAMES, split_classes
from metanlp.data.validation import POOL_SOURCE
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
    if params.data.pool is not None:
        return build_from_pool(params.data.pool, root)
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


# the corpus file each pool role is written to
POOL_SPLITS = {"meta_train": "train", "meta_val": "val", "eval": "test"}


def build_from_pool(pool: TaskPool, root: Path) -> dict:
    """A task pool's datasets -> the same three files: a role's label spaces joined (class `space::label`,
    domain = the space), and in the manifest each space's sampling weight, so meta-training draws a dataset by
    its weight and evaluation reports each eval dataset by name."""
    from metanlp.data.pool import entry_path, joined, load_spaces, space_weights

    report = read_json(root / REPORT, "validate")
    if not report["success"] or report["source"] != POOL_SOURCE:
        raise StageError("data.tasks: has no passing validation report; run the validate stage first")
    manifest: dict = {"source": POOL_SOURCE, "datasets": {}, "rows": {}, "classes": {}, "space_weights": {}}
    for role, name in POOL_SPLITS.items():
        spaces = []
        for entry in (e for e in pool.tasks if e.role == role):
            from_entry = load_spaces(entry, root, ROLE_SPLITS[role])
            path = entry_path(entry, root)
            manifest["datasets"][entry.name] = {
                "role": role, "path": entry.path, "md5": file_digest(default_corpus_path() if path == "default"
                                                                     else Path(path)),
                "label_spaces": [space.name for space in from_entry]}
            spaces += from_entry
        part = joined(spaces, source=f"{POOL_SOURCE}:{role}")
        write_labelled(part, root / CORPUS / f"{name}.jsonl")
        manifest["rows"][name], manifest["classes"][name] = len(part), part.classes
        manifest["space_weights"][name] = space_weights(pool, spaces)
    digests = sorted(d["md5"] for d in manifest["datasets"].values())
    manifest["source_md5"] = hashlib.md5(json.dumps(digests).encode()).hexdigest()
    write_json(root / MANIFEST, manifest)
    return {"manifest": str(root / MANIFEST), "rows": manifest["rows"]}


def split_spaces(root: Path, name: str, data: LabelledTexts, label_spaces: str) -> dict[str, float] | None:
    """The episode sampler's label spaces for a corpus file: a pool's weights as its manifest records them,
    else what data.label_spaces says of the file's domains."""
    from metanlp.data.pool import label_space_weights

    recorded = read_json(root / MANIFEST, "build_corpus").get("space_weights")
    return recorded[name] if recorded else label_space_weights(data, label_spaces)


def load_split(root: Path, name: str) -> LabelledTexts:
    path = root / CORPUS / f"{name}.jsonl"
    if not path.exists():
        raise StageError(f"{path}: missing; run the build_corpus stage first")
    # a pool's label spaces may give one text two labels (ARSC's tasks): one label per text within a space
    pooled = "space_weights" in read_json(root / MANIFEST, "build_corpus")
    return load_labelled(path, separate_tasks=pooled)


STAGE = Stage(name="build_corpus", run=run, params=("data",), deps=("data", REPORT), outs=(CORPUS,),
              done=(MANIFEST,), inputs=corpus_file)
