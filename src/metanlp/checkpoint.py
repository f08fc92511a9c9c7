"""Resumable meta-training: everything a run needs to continue to the same result, without pickle.

A checkpoint folder holds `weights.safetensors` (the learner now), `best.safetensors` (the best weights so
far), `optimizer.safetensors` (the optimizer's tensors and torch's RNG state, one per process of a distributed
run) and `state.json` (step, history, optimizer hyperparameters, the episode sampler's RNG state, and a
fingerprint of the settings).
It is written whole or not at all, and only resumed by a run with the same fingerprint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from metanlp.atomic import replace_directory
from metanlp.data.load import DataError


@dataclass
class LoopState:
    step: int = 0
    history: list[dict] = field(default_factory=list)
    best_accuracy: float = float("-inf")
    best_episode: int = 0
    stale: int = 0


def save_checkpoint(directory: Path, fingerprint: dict, learner, optimizer, sampler, state: LoopState,
                    best_state: dict | None, rng_states: list[torch.Tensor] | None = None) -> None:
    """`rng_states`: torch's generator state of each process, by rank (default: this process's)."""
    rng_states = rng_states or [torch.get_rng_state()]

    def write(staging: Path) -> None:
        save_model(learner, str(staging / "weights.safetensors"))
        if best_state is not None:
            save_file({k: v.contiguous() for k, v in best_state.items()}, str(staging / "best.safetensors"))
        opt = optimizer.state_dict()
        tensors = {f"opt.{index}.{key}": value.detach().cpu().contiguous()
                   for index, slots in opt["state"].items() for key, value in slots.items()}
        for rank, rng in enumerate(rng_states):
            tensors["rng.torch" if rank == 0 else f"rng.torch.{rank}"] = rng
        save_file(tensors, str(staging / "optimizer.safetensors"))
        (staging / "state.json").write_text(json.dumps({
            "fingerprint": fingerprint, "loop": asdict(state), "param_groups": opt["param_groups"],
            "sampler": sampler.state(), "has_best": best_state is not None}, indent=1))

    replace_directory(directory, write, marker="state.json")


def load_checkpoint(directory: Path, fingerprint: dict, learner, optimizer, sampler,
                    rank: int = 0) -> tuple[LoopState, dict | None]:
    """Restore a run in place (as process `rank` of a distributed run); returns its loop state and best weights."""
    meta = json.loads((directory / "state.json").read_text())
    if meta["fingerprint"] != fingerprint:
        changed = sorted(k for k in fingerprint if fingerprint[k] != meta["fingerprint"].get(k))
        raise DataError(f"{directory}: the checkpoint was written with other settings ({', '.join(changed)}); "
                        f"delete it to start again")
    load_model(learner, str(directory / "weights.safetensors"))
    tensors = load_file(str(directory / "optimizer.safetensors"))
    rngs = {name: tensors.pop(name) for name in list(tensors) if name.startswith("rng.")}
    torch.set_rng_state(rngs["rng.torch" if rank == 0 else f"rng.torch.{rank}"])
    slots: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        slots.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    sampler.set_state(meta["sampler"])
    best = load_file(str(directory / "best.safetensors")) if meta["has_best"] else None
    return LoopState(**meta["loop"]), best
