"""Saved learners: `learner.json` (the spec: what it is and where it came from) + `model.safetensors` (its
weights) + `encoder/` (architecture and tokenizer, no weights) + what the learner keeps beside them
(`save_extra`: the memory learner's `memory/`). Nothing is ever unpickled.

learner.json files of the first format (a learner name with its options in a family section) are read and
upgraded; one whose options the learner's kind no longer accepts is refused with what to change.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from metanlp.atomic import file_digest, replace_directory
from metanlp.config import LearnerSpec, Provenance, describe_validation_error
from metanlp.data.load import DataError
from metanlp.encoder import TextEncoder
from metanlp.learners.base import Learner
from metanlp.learners.registry import LEARNERS, build_learner

SPEC_FILE, WEIGHTS_FILE, ENCODER_DIR = "learner.json", "model.safetensors", "encoder"


def save_learner(learner: Learner, directory: str | Path, provenance: Provenance | None = None,
                 force: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """Write the learner to `directory` atomically: a crash leaves the old contents, never half a model; a
    folder that is not a metanlp model is not replaced unless `force`.
    `provenance` replaces the learner's own record (e.g. a domain-adapted copy says what it was adapted on);
    `extra_files` (name -> text) are written with the model, in the same swap (e.g. its training history)."""
    spec = learner.spec() if provenance is None else learner.spec().model_copy(update={"provenance": provenance})

    def write(staging: Path) -> None:
        (staging / SPEC_FILE).write_text(spec.model_dump_json(indent=2))
        save_model(learner, str(staging / WEIGHTS_FILE))
        learner.encoder.save_architecture(staging / ENCODER_DIR)
        learner.save_extra(staging)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")

    return replace_directory(directory, write, marker=SPEC_FILE, force=force)


def read_spec(directory: str | Path) -> LearnerSpec:
    directory = Path(directory)
    path = directory / SPEC_FILE
    if not path.is_file():
        raise DataError(f"{directory}: not a metanlp model (no {SPEC_FILE})")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a valid learner spec: {err}") from err
    try:
        return LearnerSpec.model_validate(raw)
    except ValidationError as err:
        hint = ""
        if isinstance(raw, dict) and isinstance(raw.get("learner"), str):
            hint = (f"; it was written by an earlier metanlp and its options do not fit the {raw['learner']!r} "
                    "learner: set the learner's kind to one whose options these are (e.g. 'maml') or retrain")
        raise DataError(f"{path}: not a valid learner spec: {describe_validation_error(err)}{hint}") from err


def kept_beside(directory: str | Path) -> dict[str, str]:
    """The digest of each file or folder the model's learner keeps beside its weights (`Learner.saved_beside`:
    ProtoNet's label base rates, a memory learner's memory), those present, by name."""
    directory = Path(directory)
    names = LEARNERS[read_spec(directory).learner.kind].saved_beside
    return {name: file_digest(directory / name) for name in names if (directory / name).exists()}


def load_learner(directory: str | Path, attn_implementation: str | None = None) -> Learner:
    directory = Path(directory)
    spec = read_spec(directory)
    encoder_config = spec.encoder
    if attn_implementation:
        encoder_config = encoder_config.model_copy(update={"attn_implementation": attn_implementation})
    encoder = TextEncoder.from_architecture(directory / ENCODER_DIR, encoder_config)
    learner = build_learner(spec.learner, encoder, spec.provenance)
    learner.adaptation = spec.adaptation
    try:
        missing, unexpected = load_model(learner, str(directory / WEIGHTS_FILE), strict=False)
    except (SafetensorError, OSError) as err:  # never anything else: a file that is not safetensors is refused
        raise DataError(f"{directory / WEIGHTS_FILE}: not a safetensors file ({err})") from err
    if missing or unexpected:
        raise DataError(f"{directory / WEIGHTS_FILE}: weights do not match the {spec.learner.kind!r} learner "
                        f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    learner.load_extra(directory)
    return learner.eval()
