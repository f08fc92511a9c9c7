"""Episodes -> meta-trained learner: the episodic training loop.

Validation every `val_every` episodes on a fixed set of validation episodes (disjoint classes), early
stopping on validation accuracy, and the best weights kept (written to disk at the end when a directory
is given). Run by several processes (torchrun, or `train.distributed.processes`), each takes a share of
every meta-batch (`metanlp.distributed`) and rank 0 alone validates and writes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from metanlp.atomic import check_replaceable, clean_leftovers
from metanlp.checkpoint import LoopState, load_checkpoint, save_checkpoint
from metanlp.config import LearnerSpec, TrainConfig
from metanlp.data.episodes import EpisodeSampler
from metanlp.data.load import LabelledTexts
from metanlp.data.smlmt import CLASS_PREFIX
from metanlp.distributed import World, current_world, launch
from metanlp.encoder import resolve_device
from metanlp.evaluation import mean_ci, run_episode
from metanlp.learners import Learner, build_learner, save_learner
from metanlp.learners.persistence import SPEC_FILE
from metanlp.progress import progress_bar
from metanlp.runtime import seeded

HISTORY_FILE = "history.json"  # beside the saved model: the validation history (reporting plots it)


class TrainingInterrupted(RuntimeError):
    def __init__(self, step: int) -> None:
        super().__init__(f"meta-training stopped after step {step}; run again with the same checkpoint to resume")
        self.step = step


@dataclass
class TrainResult:
    best_val_accuracy: float
    best_episode: int
    episodes_run: int
    stopped_early: bool
    history: list[dict] = field(default_factory=list)


def validate(learner: Learner, tokens, episodes, seed: int) -> tuple[float, float]:
    learner.eval()
    accuracies = [run_episode(learner, ep, tokens, tokens, seed + i).accuracy for i, ep in enumerate(episodes)]
    return mean_ci(np.array(accuracies))


def meta_train(learner: Learner, train_data: LabelledTexts, val_data: LabelledTexts, config: TrainConfig,
               out_dir: str | Path | None = None, show_progress: bool = True,
               checkpoint_dir: str | Path | None = None, stop_after: int | None = None,
               on_validation: Callable[[int, float], None] | None = None, *,
               train_spaces: dict[str, float] | None = None,
               val_spaces: dict[str, float] | None = None, force: bool = False) -> TrainResult:
    """Meta-train `learner` in place and return its history. `force`: replace an `out_dir` that is not a model.

    `train_spaces` / `val_spaces`: the data is a task pool's joined set (`data.pool`); episodes are drawn
    space by space with these weights, each from one label space, ways = min(N, its classes).

    With `checkpoint_dir`, the whole run state is saved at every validation and a later call with the same
    settings resumes from it and ends where an uninterrupted run would. `stop_after` ends the run (with
    `TrainingInterrupted`) after that many steps, as a preemption would. `on_validation(step, accuracy)` is
    called after every validation (a tuner reports it and may raise to prune the run).

    In a process group (torchrun), every rank calls this alike; each meta-trains on its share of every
    meta-batch, rank 0 validates, checkpoints and saves, and all return with rank 0's best weights.
    """
    if not learner.meta_trainable:
        raise ValueError(f"learner {learner.name!r} has nothing to meta-train")
    world = current_world()
    world.check_meta_batch(config.tasks_per_step)
    if world.active and on_validation is not None:
        raise ValueError("a distributed run takes no per-validation callback (tuning trials run one process "
                         "each; scale tuning out with `metanlp tune --workers`)")
    if out_dir is not None:  # refused now, not after the training it would have thrown away
        check_replaceable(out_dir, SPEC_FILE, force)
    # Dropout draws from torch's global generator (it takes no other): seeded here (per rank), restored after.
    with seeded(config.seed + world.rank):
        return _meta_train(learner, train_data, val_data, config, out_dir, show_progress, checkpoint_dir, stop_after,
                           on_validation, train_spaces, val_spaces, force, world)


def _meta_train(learner: Learner, train_data: LabelledTexts, val_data: LabelledTexts, config: TrainConfig,
                out_dir, show_progress, checkpoint_dir, stop_after, on_validation, train_spaces,
                val_spaces, force, world: World) -> TrainResult:
    device = world.device(resolve_device(config.device))
    learner.to(device)
    world.broadcast_weights(learner)  # every rank starts from rank 0's weights
    encoder = learner.encoder
    train_tokens, val_tokens = encoder.tokenize(train_data.texts), encoder.tokenize(val_data.texts)
    e = config.episode
    mix = None if config.smlmt_fraction is None else (CLASS_PREFIX, config.smlmt_fraction)
    sampler = EpisodeSampler(train_data, e.ways, e.shots, e.queries, seed=config.seed, mix=mix, spaces=train_spaces)
    v = config.val_episode
    val_episodes = EpisodeSampler(val_data, v.ways, v.shots, v.queries, seed=config.seed + 1,
                                  spaces=val_spaces).take(config.val_episodes)

    at_encoder_rate = ("encoder.", *(f"{name}." for name in learner.encoder_rate_modules))
    encoder_params = [p for n, p in learner.named_parameters() if n.startswith(at_encoder_rate) and p.requires_grad]
    other_params = [p for n, p in learner.named_parameters() if not n.startswith(at_encoder_rate) and p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": encoder_params, "lr": config.lr, "weight_decay": config.weight_decay},
        {"params": other_params, "lr": config.scale_lr, "weight_decay": 0.0},
    ])
    warmup = max(config.warmup_episodes, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))

    fingerprint = {"learner": learner.spec().model_dump(mode="json"), "train": config.model_dump(mode="json"),
                   "train_rows": len(train_data), "val_rows": len(val_data)}
    if train_spaces or val_spaces:  # a pool run resumes only with the same spaces and weights
        fingerprint["spaces"] = {"train": train_spaces, "val": val_spaces}
    if world.active:  # each rank's share of the meta-batch depends on how many ranks there are
        fingerprint["world_size"] = world.size
    # the weights meta-training starts from (before a checkpoint is loaded), for the anchor's pull
    starting = [(p, p.detach().clone()) for p in encoder_params] if config.anchor > 0 else []
    checkpoint = Path(checkpoint_dir) if checkpoint_dir else None
    for written in (checkpoint, out_dir):  # what a killed earlier run left half-swapped
        if written is not None and world.main:
            clean_leftovers(written)
    world.barrier()  # no rank reads the checkpoint while rank 0 tidies it
    best_state = None
    if checkpoint is not None and (checkpoint / "state.json").exists():
        state, best_state = load_checkpoint(checkpoint, fingerprint, learner, optimizer, sampler, world.rank)
        schedule.last_epoch = state.step  # the learning rates themselves came back with the optimizer
    else:
        state = LoopState()
        if world.main:
            val_acc, val_ci = validate(learner, val_tokens, val_episodes, config.seed)
            state.history.append({"episode": 0, "val_accuracy": val_acc, "val_ci95": val_ci})
            state.best_accuracy = val_acc
            # The starting weights are a candidate too: if no validation beats them, they are what is kept.
            best_state = {k: v.detach().cpu().clone() for k, v in learner.state_dict().items()}
        state = world.broadcast(state)
    trained = [p for p in learner.parameters() if p.requires_grad]
    losses, accs, stopped_early = [], [], state.stale >= config.patience
    with progress_bar(f"meta-train {learner.name}", config.episodes, show_progress and world.main) as advance:
        for _ in range(state.step):
            advance()
        while state.step < config.episodes and not stopped_early:
            state.step += 1
            learner.train()
            episodes = sampler.take(config.tasks_per_step)  # the same meta-batch on every rank
            mine = world.share(episodes)
            optimizer.zero_grad(set_to_none=True)
            loss, logits = learner.backward_batch(train_tokens, mine)
            world.all_reduce_gradients(trained, len(mine), len(episodes))
            for weight, start in starting:  # d/dw of anchor * |w - w0|^2, the same on every rank
                if weight.grad is not None:
                    weight.grad.add_(weight.detach() - start, alpha=2 * config.anchor)
            torch.nn.utils.clip_grad_norm_(learner.parameters(), config.grad_clip)
            optimizer.step()
            schedule.step()
            correct = sum(float((lg.argmax(-1).cpu().numpy() == e.query_labels).mean())
                          for lg, e in zip(logits, mine, strict=True))
            loss_sum, correct_sum = world.all_sum([loss.item() * len(mine), correct], device)
            losses.append(loss_sum / len(episodes))
            accs.append(correct_sum / len(episodes))
            advance(loss=float(np.mean(losses[-20:])), acc=float(np.mean(accs[-20:])), val=state.best_accuracy)
            if state.step % config.val_every and state.step != config.episodes:
                continue
            if world.main:
                val_acc, val_ci = validate(learner, val_tokens, val_episodes, config.seed)
                state.history.append({"episode": state.step, "train_loss": float(np.mean(losses)),
                                      "train_accuracy": float(np.mean(accs)), "val_accuracy": val_acc,
                                      "val_ci95": val_ci})
                if on_validation is not None:
                    on_validation(state.step, val_acc)
                if val_acc > state.best_accuracy:
                    state.best_accuracy, state.best_episode, state.stale = val_acc, state.step, 0
                    best_state = {k: v.detach().cpu().clone() for k, v in learner.state_dict().items()}
                else:
                    state.stale += 1
            state = world.broadcast(state)
            losses, accs, stopped_early = [], [], state.stale >= config.patience
            if checkpoint is not None:
                rng_states = world.gather(torch.get_rng_state())
                if world.main:
                    save_checkpoint(checkpoint, fingerprint, learner, optimizer, sampler, state, best_state,
                                    rng_states)
            if stop_after is not None and state.step >= stop_after:
                world.barrier()  # the checkpoint is whole before any rank stops
                raise TrainingInterrupted(state.step)
    if best_state is not None:
        learner.load_state_dict(best_state)
    world.broadcast_weights(learner)  # every rank ends with rank 0's best weights
    learner.eval()
    # after validation, which scores balanced episodes: base rates would only blur the model's selection there
    learner.learn_from_training_rows(train_data)
    result = TrainResult(state.best_accuracy, state.best_episode, state.step, stopped_early, state.history)
    if world.main:
        if out_dir is not None:  # written once, at the end: an interrupted run leaves no half-trained model
            save_learner(learner, out_dir, force=force,
                         extra_files={HISTORY_FILE: json.dumps(result.__dict__, indent=2)})
        if checkpoint is not None:
            shutil.rmtree(checkpoint, ignore_errors=True)
    world.barrier()  # the model is written when any rank returns
    return result


def train_learner(spec: LearnerSpec, train_data: LabelledTexts, val_data: LabelledTexts, config: TrainConfig,
                  out_dir: str | Path | None = None, show_progress: bool = True,
                  checkpoint_dir: str | Path | None = None,
                  on_validation: Callable[[int, float], None] | None = None, *,
                  train_spaces: dict[str, float] | None = None,
                  val_spaces: dict[str, float] | None = None, force: bool = False) -> TrainResult:
    """Build the learner `spec` describes (its provenance included) and meta-train it: the one training path
    of `metanlp train`, the pipeline's meta_train stage and every tuning trial.

    With `config.distributed.processes` > 1 and no process group yet, that many processes are started and each
    runs this (rank 0's result is returned; the model is in `out_dir`)."""
    processes = config.distributed.processes
    if processes > 1 and not current_world().active:
        if on_validation is not None:
            raise ValueError("train.distributed.processes > 1 takes no per-validation callback (tuning trials "
                             "run one process each; scale tuning out with `metanlp tune --workers`)")
        return launch(processes, partial(train_learner, spec, train_data, val_data, config, out_dir, show_progress,
                                         checkpoint_dir, train_spaces=train_spaces, val_spaces=val_spaces,
                                         force=force))
    learner = build_learner(spec.learner, spec.encoder, spec.provenance)
    learner.adaptation = spec.adaptation
    return meta_train(learner, train_data, val_data, config, out_dir, show_progress, checkpoint_dir,
                      on_validation=on_validation, train_spaces=train_spaces, val_spaces=val_spaces, force=force)
