"""Unlabeled text (+ the training classes, for hybrid) -> the encoder meta-training starts from, in
artifacts/pretrained/ (a Hugging Face directory) with pretrain.json; with no `pretrain.modes`, only
pretrain.json is written and meta-training starts from `meta_train.encoder`."""

from __future__ import annotations

import shutil
from pathlib import Path

from metanlp.config import MetaTrainParams, PipelineParams
from metanlp.stages.build_corpus import CORPUS, load_split
from metanlp.stages.common import Stage, read_json, write_json

PRETRAINED = "artifacts/pretrained"
RECORD = f"{PRETRAINED}/pretrain.json"


def text_sources(params: PipelineParams, root: Path) -> list[str]:
    """params.yaml's text paths, relative to the project root ('default' is the embedded corpus)."""
    return [t if t == "default" else str((root / t).resolve()) for t in params.pretrain.text]


def starting_encoder(params: PipelineParams, root: Path) -> MetaTrainParams:
    """meta_train's params with the pretrained encoder in place of `meta_train.encoder` when there is one."""
    record = read_json(root / RECORD, "pretrain")
    if not record["modes"]:
        return params.meta_train
    encoder = params.meta_train.encoder.model_copy(update={"name_or_path": str(root / PRETRAINED)})
    return params.meta_train.model_copy(update={"encoder": encoder})


def run(params: PipelineParams, root: Path, show_progress: bool = True) -> dict:
    from metanlp.pretrain import pretrain_encoder, save_encoder

    out = root / PRETRAINED
    config = params.pretrain.model_copy(update={"text": text_sources(params, root)})
    if not config.modes:
        if out.exists():
            shutil.rmtree(out)
        write_json(root / RECORD, {"modes": []})
        return {"modes": []}
    labelled = load_split(root, "train") if config.hybrid else None
    encoder, summary = pretrain_encoder(config, params.meta_train.encoder, labelled, params.meta_train.train.device,
                                        show_progress)
    save_encoder(encoder, out)
    write_json(root / RECORD, summary)
    return summary


def _text_files(params: PipelineParams, root: Path) -> list[Path]:
    return [Path(t) for t in text_sources(params, root) if t != "default"]


# pretrain.text files outside data/ are seen by DVC through the pretrain.text param only.
STAGE = Stage(name="pretrain", run=run, params=("pretrain", "meta_train.encoder", "meta_train.train.device"),
              deps=(f"{CORPUS}/train.jsonl",), outs=(PRETRAINED,), done=(RECORD,), inputs=_text_files)
