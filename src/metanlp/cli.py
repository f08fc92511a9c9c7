"""`metanlp` command line: one command per stage (train, evaluate, predict) and `run` for both."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from metanlp.config import (
    DEFAULT_ENCODER,
    EMBEDDED_SPLIT,
    LEARNER_KINDS,
    DefaultAdaptation,
    DistilConfig,
    DistributedConfig,
    EncoderConfig,
    EpisodeConfig,
    LearnerSpec,
    MemoryConfig,
    Provenance,
    SplitConfig,
    TrainConfig,
    describe_validation_error,
    learner_config,
    meta_trainable_kinds,
)
from metanlp.data.load import (
    DEFAULT_CORPUS,
    DataError,
    LabelledTexts,
    load_labelled,
    quote,
    read_texts,
    shared_texts,
)
from metanlp.runtime import apply_environment_defaults
from metanlp.stages import StageError, load_params

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Meta-learning for few-shot text classification on pretrained Transformer encoders.")
# soft_wrap: messages carry file paths that must stay on one line to be copied or grepped.
err_console = Console(stderr=True, soft_wrap=True)


def report(kind: str, message: str) -> None:
    """Print an error or warning; the message is user text, so rich markup in it is escaped."""
    colour = "red" if kind == "error" else "yellow"
    one_line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    err_console.print(f"[{colour}]{kind}:[/{colour}] {escape(one_line)}")


def cli_errors(func):
    """Bad input ends with a one-line message naming what is wrong and where, and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        apply_environment_defaults()
        try:
            return func(*args, **kwargs)
        except ValidationError as err:
            report("error", f"invalid parameter: {describe_validation_error(err)}")
        except (DataError, ValueError, FileNotFoundError, StageError) as err:
            report("error", str(err))
        raise typer.Exit(2)

    return wrapper


def _csv(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def _ints(value: str, option: str, least: int = 1) -> list[int]:
    try:
        numbers = [int(part) for part in _csv(value)]
    except ValueError as err:
        raise DataError(f"{option} takes comma-separated integers, got {value!r}") from err
    if not numbers or min(numbers) < least:
        raise DataError(f"{option} takes integers from {least}, got {value!r}")
    return numbers


def _adapt_budget(options: dict):
    """The adaptation budget with the options a user gave; the budget's own defaults where they are None."""
    from metanlp.adaptation import AdaptBudget

    return AdaptBudget(**{k: v for k, v in options.items() if v is not None})


def _split_config(data: str, split_by: str | None, train_domains: str | None, val_domains: str | None,
                  test_domains: str | None, split_sizes: str | None, exclude: str | None, seed: int) -> SplitConfig:
    if split_by is None and not (train_domains or split_sizes):
        if data != DEFAULT_CORPUS:
            raise DataError("give the class split: --train-domains/--val-domains/--test-domains, "
                            "or --split-sizes TRAIN,VAL,TEST")
        return EMBEDDED_SPLIT
    by = split_by or ("random" if split_sizes else "domain")
    sizes = tuple(_ints(split_sizes, "--split-sizes")) if split_sizes else None
    return SplitConfig(by=by, train_domains=_csv(train_domains), val_domains=_csv(val_domains),
                       test_domains=_csv(test_domains), sizes=sizes, exclude_labels=_csv(exclude), seed=seed)


def _learner_config(learner: str, **options):
    """The learner's spec from its kind and the learner options given (None: not given). An option the kind
    does not take is refused naming the meta-trainable kinds whose configs have it."""
    given = {k: v for k, v in options.items() if v is not None}
    config = learner_config(learner)
    unknown = [k for k in given if k not in type(config).model_fields]
    if unknown:
        takers = ", ".join(meta_trainable_kinds(unknown[0]))
        raise DataError(f"--{unknown[0].replace('_', '-')} is for {takers}, not {learner!r}")
    return learner_config(learner, **given)


DataOpt = Annotated[str, typer.Option(help="labelled JSONL/CSV/Parquet file, 'default' (embedded corpus) "
                                            "or a Hugging Face dataset name")]
TextColumnOpt = Annotated[str, typer.Option(help="column holding the texts in your labelled files")]
LabelColumnOpt = Annotated[str, typer.Option(help="column holding the labels in your labelled files")]
# the encoder-tuning strategies' budget, the same on every command that adapts
RefitOpt = Annotated[bool, typer.Option(help="contrastive and finetune: after choosing the steps on a held-out shot, "
                                             "train again on every row (half the seconds each); by default the "
                                             "choosing pass's best weights are kept")]
TopLayersOpt = Annotated[int | None, typer.Option(min=1, help="contrastive and finetune tune only the top N encoder "
                                                              "layers; the layers below run once per support set "
                                                              "(default: all layers)")]
BatchesOpt = Annotated[Literal["nearest", "random"] | None, typer.Option(
    help="contrastive: the classes of a batch, at random or one class and those nearest it under the starting "
         "weights (hard negatives: fine-grained label spaces) [default: random]")]


@app.command()
@cli_errors
def train(
    out: Annotated[Path, typer.Option(help="directory for the meta-trained model")] = Path("models/default"),
    data: DataOpt = DEFAULT_CORPUS,
    pool: Annotated[Path | None, typer.Option(
        help="a task pool (YAML `tasks:` list of datasets with roles meta_train, meta_val, eval): episodes come "
             "from its meta_train datasets, validation from its meta_val ones; replaces --data and the split")] = None,
    val_data: Annotated[str | None, typer.Option(help="file for the validation classes (default: --data)")] = None,
    text_column: TextColumnOpt = "text",
    label_column: LabelColumnOpt = "label",
    learner: Annotated[Literal[LEARNER_KINDS], typer.Option(help="meta-learner (or a baseline to save)")] = "protonet",
    encoder: Annotated[str, typer.Option(help="HF name, local path or 'default' (all-MiniLM-L6-v2)")] = DEFAULT_ENCODER,
    pooling: Annotated[Literal["mean", "cls"], typer.Option(help="sentence embedding: mean of tokens or [CLS]")
                       ] = "mean",
    max_length: Annotated[int, typer.Option(min=8, help="tokens per text (longer texts are cut)")] = 64,
    keep_tail: Annotated[float, typer.Option(
        min=0, max=0.99, help="a longer text keeps this share of --max-length from its end, the middle cut out "
        "(0: the start only)")] = 0.0,
    split_by: Annotated[Literal["domain", "random"] | None, typer.Option(
        help="split classes by whole domains or at random (default: domain when the data has domains)")] = None,
    train_domains: Annotated[str | None, typer.Option(help="comma-separated domains for meta-training")] = None,
    val_domains: Annotated[str | None, typer.Option(help="comma-separated domains for validation")] = None,
    test_domains: Annotated[str | None, typer.Option(help="comma-separated domains held out for testing")] = None,
    split_sizes: Annotated[str | None, typer.Option(help="TRAIN,VAL,TEST class counts (random split)")] = None,
    exclude_labels: Annotated[str | None, typer.Option(help="labels left out of every split, e.g. oos")] = None,
    label_spaces: Annotated[Literal["split", "domain"] | None, typer.Option(
        help="domain: an episode's classes come from one domain (ways = min(N, its classes)); split: from the "
             "whole split (default: domain for the embedded corpus, else split)")] = None,
    episodes: Annotated[int, typer.Option(help="meta-training steps")] = TrainConfig().episodes,
    tasks_per_step: Annotated[int, typer.Option(help="episodes per meta-batch")] = 1,
    inner_steps: Annotated[int | None, typer.Option(help="gradient learners: inner-loop steps")] = None,
    inner_lr: Annotated[float | None, typer.Option(help="gradient learners: inner learning rate")] = None,
    adapt: Annotated[Literal["head", "top", "all", "lora"] | None, typer.Option(
        help="gradient learners: what the inner loop adapts (the head, the top layers, all, or LoRA adapters)")] = None,
    top_layers: Annotated[int | None, typer.Option(help="gradient learners: layers adapted with --adapt top")] = None,
    label_prior: Annotated[float | None, typer.Option(
        min=0, help="ProtoNet: add the label names' base rates in the meta-training tasks, times this weight, to "
                    "a new task's logits (1: Bayes' rule; for new tasks of the training tasks' kind)")] = None,
    label_head: Annotated[float | None, typer.Option(
        min=0, help="ProtoNet: fit a linear classifier of the training rows' label names on the trained model's "
                    "embeddings, and add its logits, times this weight, to a new task's classes of those names "
                    "(a new domain of the training tasks' kind)")] = None,
    supcon: Annotated[float | None, typer.Option(
        min=0, help="ProtoNet: add this weight times a supervised contrastive loss over each episode's rows to the "
                    "prototype loss (0: off, the default here; params.yaml's pipeline uses 1)")] = None,
    default_adaptation: Annotated[Literal["contrastive", "untuned"], typer.Option(
        help="what `predict` and the service do with a new support set unless asked otherwise (written in "
             "learner.json): contrastive (the top four layers tuned on the support first, seconds to a minute: "
             "README 'The default adaptation') or untuned (the learner's own rule alone, milliseconds)")
    ] = "contrastive",
    ways: Annotated[int, typer.Option(help="classes per training and validation episode (validation: 1-shot)")
                    ] = 5,
    shots: Annotated[int, typer.Option(help="support examples per class in an episode")] = 5,
    queries: Annotated[int, typer.Option(help="query examples per class in an episode")] = 5,
    lr: Annotated[float, typer.Option(help="outer (meta) learning rate")] = TrainConfig().lr,
    val_every: Annotated[int, typer.Option(help="validate every N steps")] = TrainConfig().val_every,
    val_episodes: Annotated[int, typer.Option(help="validation episodes")] = TrainConfig().val_episodes,
    patience: Annotated[int, typer.Option(help="validations without improvement before stopping early")
                        ] = TrainConfig().patience,
    seed: Annotated[int, typer.Option(help="seed of the episodes and of any new weights")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    processes: Annotated[int, typer.Option(
        min=1, help="data-parallel processes on this machine, each with a share of every meta-batch (one GPU "
                    "each on CUDA); under torchrun, leave at 1: torchrun's processes are the world")] = 1,
    checkpoint: Annotated[bool, typer.Option(
        help="save the run state at every validation to OUT.checkpoint/ and resume from it if present")] = True,
    force: Annotated[bool, typer.Option(help="replace --out even if it is not an output of this command")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Meta-train a learner on episodes from the training classes; keep the best on validation classes.

    `torchrun --nproc-per-node N -m metanlp train ...` runs it data-parallel (rank 0 writes)."""
    from metanlp.data.splits import split_classes
    from metanlp.distributed import joined
    from metanlp.reporting import write_training_report
    from metanlp.train import train_learner

    config = TrainConfig(episodes=episodes, tasks_per_step=tasks_per_step, lr=lr, val_every=val_every,
                         val_episodes=val_episodes, patience=patience, seed=seed, device=device,
                         distributed=DistributedConfig(processes=processes),
                         episode=EpisodeConfig(ways=ways, shots=shots, queries=queries),
                         val_episode=EpisodeConfig(ways=ways, shots=1, queries=queries))
    spec_learner = _learner_config(learner, inner_steps=inner_steps, inner_lr=inner_lr, adapt=adapt,
                                   top_layers=top_layers, label_prior=label_prior, label_head=label_head,
                                   supcon=supcon)
    encoder_config = EncoderConfig(name_or_path=encoder, pooling=pooling, max_length=max_length, keep_tail=keep_tail)
    spaces = {}
    if pool is not None:
        from metanlp.data.pool import read_pool, role_set

        task_pool, pool_root = read_pool(pool)
        train_set, spaces["train_spaces"] = role_set(task_pool, pool_root, "meta_train")
        val_set, spaces["val_spaces"] = role_set(task_pool, pool_root, "meta_val")
        provenance = Provenance(pool=task_pool, train_data=str(pool))
    else:
        split = _split_config(data, split_by, train_domains, val_domains, test_domains, split_sizes, exclude_labels,
                              seed)
        corpus = load_labelled(data, text_column=text_column, label_column=label_column)
        classes = split_classes(corpus, split)
        _validate_like_the_pipeline(data, split, max(shots, 1) + queries, text_column, label_column)
        validation = (load_labelled(val_data, text_column=text_column, label_column=label_column) if val_data
                      else corpus)
        train_set, val_set = corpus.with_classes(classes.train), validation.with_classes(classes.val)
        if len(val_set) == 0:
            raise DataError(f"{validation.source}: has none of the validation classes {classes.val[:5]}")
        from metanlp.data.pool import label_space_weights

        mode = label_spaces or ("domain" if data == DEFAULT_CORPUS else "split")
        spaces = {"train_spaces": label_space_weights(train_set, mode),
                  "val_spaces": label_space_weights(val_set, mode)}
        if leaked := shared_texts(train_set, val_set):
            raise DataError(f"{len(leaked)} texts are both in the training classes and in the validation ones "
                            f"(e.g. {quote(leaked[0], 80)}): validation would not be on unseen examples")
        provenance = Provenance(split=split, classes=classes.to_dict(), train_data=data)
    spec = LearnerSpec(learner=spec_learner, encoder=encoder_config, provenance=provenance,
                       adaptation=DefaultAdaptation() if default_adaptation == "contrastive" else None)
    checkpoint_dir = out.with_name(out.name + ".checkpoint") if checkpoint else None
    with joined(device) as world:
        if checkpoint_dir is not None and checkpoint_dir.exists() and world.main:
            err_console.print(f"resuming from {checkpoint_dir}")
        result = train_learner(spec, train_set, val_set, config, out, show_progress=not quiet,
                               checkpoint_dir=checkpoint_dir, force=force, **spaces)
    if not world.main:
        return
    write_training_report(out)
    typer.echo(f"best validation accuracy {100 * result.best_val_accuracy:.1f}% at episode {result.best_episode} "
               f"({result.episodes_run} episodes run); model written to {out}")


def _validate_like_the_pipeline(data: str, split, min_examples: int, text_column: str, label_column: str) -> None:
    """The validate stage's rules (one per-row rule with the loader, classes large enough, no text in two
    splits) on a corpus file given to `train`; text length bounds are the pipeline's own choice, not here."""
    from metanlp.config import ValidateParams
    from metanlp.data.load import default_corpus_path
    from metanlp.data.validation import CorpusInvalid, validate_corpus

    path = default_corpus_path() if data == DEFAULT_CORPUS else Path(data)
    if not path.is_file():
        return  # a Hugging Face dataset: the loader's rules only
    rules = ValidateParams(min_chars=1, max_chars=10**9)
    report_ = validate_corpus(path, rules, split, min_examples, name=data, text_column=text_column,
                              label_column=label_column)
    if not report_["success"]:
        raise CorpusInvalid(report_)


def _restrict(data: LabelledTexts, model: Path | None, split: str | None, exclude: list[str]) -> LabelledTexts:
    from metanlp.learners import read_spec

    if split is not None:
        if model is None:
            raise DataError("--split needs --model (the model knows its class split)")
        recorded = read_spec(model).provenance.classes
        if not recorded:
            raise DataError(f"{model}: the model records no class split; leave out --split")
        if split not in recorded:
            raise DataError(f"unknown split {split!r}; choose one of {sorted(recorded)}")
        classes = set(recorded[split])
        data = data.with_classes(classes)
        if len(data) == 0:
            raise DataError(f"{data.source}: has none of the model's {split} classes")
    elif model is not None:
        trained_on = set((read_spec(model).provenance.classes or {}).get("train", []))
        seen = sorted(trained_on & set(data.classes))
        if seen:
            report("warning", f"{len(seen)} classes of {data.source} were meta-trained on "
                              f"(e.g. {seen[:3]}); use --split test to score only unseen classes")
    if exclude:
        data = data.with_classes(set(data.classes) - set(exclude))
    return data


@app.command()
@cli_errors
def evaluate(
    data: DataOpt,
    model: Annotated[Path | None, typer.Option(help="meta-trained model directory")] = None,
    split: Annotated[str | None, typer.Option(help="keep only the model's train/val/test classes")] = None,
    text_column: TextColumnOpt = "text",
    label_column: LabelColumnOpt = "label",
    ways: Annotated[str, typer.Option(help="N, or 'all' for the full label space")] = "5",
    shots: Annotated[str, typer.Option(help="comma-separated, e.g. 1,5")] = "1,5",
    queries: Annotated[int, typer.Option(min=1, help="queries per class in an episode")] = 5,
    episodes: Annotated[int, typer.Option(min=2, help="episodes per setting")] = 500,
    methods: Annotated[str, typer.Option(help="comma-separated: the model's learner, frozen, finetune")] = (
        "protonet,frozen"),
    support_data: Annotated[str | None, typer.Option(
        help="full label space: draw the K shots per class from this file, score every row of --data")] = None,
    repeats: Annotated[int, typer.Option(min=1, help="support draws in the full label space")] = 3,
    exclude_labels: Annotated[str | None, typer.Option(help="labels to leave out, e.g. oos")] = None,
    label_spaces: Annotated[Literal["split", "domain"], typer.Option(
        help="domain: an episode's classes come from one domain of --data (ways = min(N, its classes)), as the "
             "pipeline's evaluate stage does with data.label_spaces: domain; split: from all its classes")] = "split",
    finetune_episodes: Annotated[int | None, typer.Option(
        min=1, help="run finetune on only the first N of the same episodes (seconds an episode on CPU)")] = None,
    adapt: Annotated[list[str] | None, typer.Option(
        help="also score the model after domain adaptation on each support set: prototypes, selfsup, contrastive, "
             "finetune, fused, transductive (refines prototypes from the queries), or a comma-separated "
             "combination (repeatable)")] = None,
    unlabeled: Annotated[str | None, typer.Option(help="--adapt selfsup: the domain's unlabeled text")] = None,
    adapt_refit: RefitOpt = False,
    adapt_batches: BatchesOpt = None,
    encoder: Annotated[str, typer.Option(help="encoder for the baselines when no --model")] = DEFAULT_ENCODER,
    seed: Annotated[int, typer.Option(help="seed of the episodes (the same for every method)")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    out: Annotated[Path, typer.Option(help="results path; .json, .md and .png are written")] = Path(
        "results/evaluation.json"),
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Evaluate methods on the same episodes: accuracy, 95% CI, paired difference to frozen, adaptation ms."""
    from metanlp.evaluation import build_settings, evaluate_model
    from metanlp.reporting import markdown_table, write_report

    ways_value: int | str = "all" if ways == "all" else _ints(ways, "--ways")[0]
    shot_list = _ints(shots, "--shots")
    names = _csv(methods)
    if not names:
        raise DataError("--methods is empty")
    exclude = _csv(exclude_labels)
    query_set = _restrict(load_labelled(data, text_column=text_column, label_column=label_column), model, split,
                          exclude)
    support_set = None
    if support_data is not None:
        support_set = load_labelled(support_data, text_column=text_column, label_column=label_column
                                    ).with_classes(set(query_set.classes))
    from metanlp.data.pool import label_space_weights

    settings = build_settings(query_set, ways_value, shot_list, queries, episodes, repeats, support_set, seed,
                              spaces=label_space_weights(query_set, label_spaces))
    extra = {}
    budget = _adapt_budget({"refit": adapt_refit, "contrastive_batches": adapt_batches})
    if adapt:
        from metanlp.adaptation import DomainAdaptedLearner
        from metanlp.encoder import resolve_device
        from metanlp.learners import load_learner

        if model is None:
            raise DataError("--adapt needs --model")
        base = load_learner(model).to(resolve_device(device))
        texts = read_texts(unlabeled) if unlabeled else None
        for combination in adapt:
            strategies = _csv(combination)
            extra[f"{base.name}+{'+'.join(strategies)}"] = DomainAdaptedLearner(base, strategies, budget,
                                                                                unlabeled=texts)
    limits = {"finetune": finetune_episodes} if finetune_episodes else None
    results = evaluate_model(model, query_set, settings, names, support_set, encoder, device, extra, seed,
                             show_progress=not quiet, episode_limits=limits)
    results["config"] = {"data": data, "model": str(model) if model else None, "split": split, "ways": ways,
                         "shots": shot_list, "queries": queries, "episodes": episodes, "repeats": repeats,
                         "support_data": support_data, "methods": names, "finetune_episodes": finetune_episodes,
                         "adapt": adapt, "adapt_refit": adapt_refit, "adapt_batches": budget.contrastive_batches,
                         "unlabeled": unlabeled, "seed": seed}
    paths = write_report(results, out, title=Path(data).stem)
    typer.echo(markdown_table(results))
    typer.echo(f"wrote {', '.join(str(p) for p in paths.values())}")


@app.command()
@cli_errors
def predict(
    model: Annotated[str, typer.Option(help="a metanlp model folder, or a registry URI such as "
                                            "models:/metanlp-classifier@champion")],
    support: Annotated[str, typer.Option(help="labelled examples (JSONL/CSV/Parquet with text, label)")],
    text: Annotated[list[str] | None, typer.Option(help="a text to classify (repeatable)")] = None,
    texts: Annotated[Path | None, typer.Option(help="file of texts: .txt one per line, or JSONL/CSV/Parquet")] = None,
    out: Annotated[Path | None, typer.Option(help="score the --texts file (any size, streamed in batches) into "
                                                  "this .csv or .jsonl, replaced only when complete")] = None,
    top: Annotated[int, typer.Option(min=1, help="scores shown (or written) per text")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines instead of a table")] = False,
    text_column: TextColumnOpt = "text",
    label_column: LabelColumnOpt = "label",
    batch_size: Annotated[int, typer.Option(min=1, help="texts encoded at once when scoring a file")] = 256,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI for models:/ (default: "
                                                          "MLFLOW_TRACKING_URI, then mlflow/ here)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    strategy: Annotated[str, typer.Option(help="how the model adapts to the support: default (as its "
                                               "learner.json says: models of the pipeline and of `train` tune "
                                               "their top four layers contrastively first, seconds to a minute), "
                                               "untuned (its own rule alone, milliseconds), logreg, or "
                                               "contrastive with the --adapt-* budget below")] = "default",
    adapt_seconds: Annotated[float | None, typer.Option(
        min=0.001, help="--strategy contrastive: wall-clock cap of the encoder tuning, its held-out checks "
                        "included (default 90)")] = None,
    adapt_top_layers: Annotated[int | None, typer.Option(
        min=1, help="--strategy contrastive: tune only the top N encoder layers (default: all)")] = None,
    adapt_batches: BatchesOpt = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Adapt the model to the support examples and label new texts: a few on the terminal, or a whole file
    (--texts with --out)."""
    from metanlp.encoder import resolve_device
    from metanlp.scoring import score_file
    from metanlp.service import open_model
    from metanlp.tasks import check_strategy, strategy_learner, tuning_budget

    check_strategy(strategy, "--strategy")  # before the model is opened
    budget = tuning_budget(strategy, adapt_seconds, adapt_top_layers, adapt_batches,
                           ("--adapt-seconds", "--adapt-top-layers", "--adapt-batches"))

    if out is not None:
        if texts is None or text:
            raise DataError("--out scores a file: give it with --texts (and no --text)")
        summary = score_file(model, support, str(texts), str(out), top=top, text_column=text_column,
                             label_column=label_column, batch_size=batch_size, device=device,
                             tracking_uri=tracking_uri, show_progress=not quiet, strategy=strategy, budget=budget)
        typer.echo(f"scored {summary.texts} texts into {summary.out} ({len(summary.classes)} classes; adapted in "
                   f"{summary.adapt_seconds:.1f} s, scored in {summary.score_seconds:.1f} s)")
        return
    queries = list(text or []) + (read_texts(texts, text_column) if texts else [])
    if not queries:
        raise DataError("give --text or --texts")
    if any(not q.strip() for q in queries):
        raise DataError("--text: empty text")
    support_set = load_labelled(support, text_column=text_column, label_column=label_column)
    learner = strategy_learner(open_model(model, tracking_uri).learner.to(resolve_device(device)), strategy, budget)
    predictions = learner.adapt(support_set.texts, support_set.labels).predict(queries)
    rows = zip(queries, predictions.labels, predictions.top(top), strict=True)
    if as_json:
        for query, label, ranked in rows:
            typer.echo(json.dumps({"text": query, "label": label, "scores": dict(ranked)}))
        return
    table = Table("text", "label", "top scores")
    for query, label, ranked in rows:
        table.add_row(query, label, ", ".join(f"{c} {s:.2f}" for c, s in ranked))
    Console().print(table)


@app.command()
@cli_errors
def pretrain(
    text: Annotated[list[str], typer.Option(help="unlabeled text: .txt (one per line), JSONL/CSV text column, "
                                                  "or 'default' (repeatable)")],
    out: Annotated[Path, typer.Option(help="directory for the pretrained encoder (HF format)")],
    mode: Annotated[str, typer.Option(help="mlm, smlmt, or mlm,smlmt (MLM first)")] = "mlm",
    encoder: Annotated[str, typer.Option(help="HF name, local path or 'default'")] = DEFAULT_ENCODER,
    mlm_steps: Annotated[int, typer.Option(help="masked-LM steps")] = 500,
    mlm_lr: Annotated[float, typer.Option(help="masked-LM learning rate")] = 5e-5,
    smlmt_episodes: Annotated[int, typer.Option(help="ProtoNet meta-training steps on cloze tasks")] = 300,
    smlmt_words: Annotated[int, typer.Option(help="cloze classes (words) drawn from the frequency band")] = 300,
    labelled: Annotated[str | None, typer.Option(help="hybrid: supervised training classes (text, label) whose "
                                                      "episodes are mixed with the cloze tasks")] = None,
    smlmt_fraction: Annotated[float, typer.Option(help="hybrid: share of episodes that are cloze tasks")] = 0.5,
    seed: Annotated[int, typer.Option(help="seed of masking, cloze tasks and sampling")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    force: Annotated[bool, typer.Option(help="replace --out even if it is not an output of this command")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Pretrain an encoder on unlabeled text: masked-LM, then (or only) ProtoNet on SMLMT cloze tasks, alone
    or mixed with supervised episodes (--labelled: hybrid).
    The result is an encoder directory for --encoder or params.yaml's meta_train.encoder.name_or_path."""
    from metanlp.atomic import check_replaceable
    from metanlp.config import PretrainParams
    from metanlp.pretrain import ENCODER_MARKER, pretrain_encoder, save_encoder

    check_replaceable(out, ENCODER_MARKER, force)

    modes = _csv(mode)
    unknown = sorted(set(modes) - {"mlm", "smlmt"})
    if not modes or unknown:
        raise DataError(f"--mode: unknown {unknown or mode!r}; use mlm, smlmt or mlm,smlmt")
    config = PretrainParams(modes=modes, text=text, mlm_steps=mlm_steps, mlm_lr=mlm_lr,
                            smlmt_episodes=smlmt_episodes, smlmt_words=smlmt_words, hybrid=labelled is not None,
                            smlmt_fraction=smlmt_fraction, seed=seed)
    text_encoder, summary = pretrain_encoder(config, EncoderConfig(name_or_path=encoder),
                                             load_labelled(labelled) if labelled else None, device, not quiet)
    if "mlm_loss_first" in summary:
        typer.echo(f"masked-LM loss {summary['mlm_loss_first']:.3f} -> {summary['mlm_loss_last20']:.3f} "
                   f"({summary['sentences']} sentences)")
    if "smlmt_classes" in summary:
        typer.echo(f"SMLMT: {summary['smlmt_classes']} cloze classes, validation accuracy "
                   f"{100 * summary['smlmt_val_accuracy']:.1f}% at step {summary['smlmt_best_step']}")
    save_encoder(text_encoder, out, force=force)
    typer.echo(f"pretrained encoder written to {out}")


@app.command()
@cli_errors
def adapt(
    model: Annotated[Path, typer.Option(help="meta-trained model directory")],
    support: Annotated[str, typer.Option(help="the new domain's labelled examples (JSONL/CSV/Parquet: text, label)")],
    out: Annotated[Path, typer.Option(help="directory for the domain-adapted model")],
    text_column: TextColumnOpt = "text",
    label_column: LabelColumnOpt = "label",
    unlabeled: Annotated[str | None, typer.Option(help="the domain's unlabeled text: .txt (one per line) or "
                                                       "JSONL/CSV with a text column")] = None,
    strategy: Annotated[str, typer.Option(help="comma-separated: prototypes, selfsup, contrastive, finetune, "
                                               "fused")] = "finetune",
    steps: Annotated[int, typer.Option(min=1, help="most fine-tuning steps (the held-out shot picks how many)")] = 30,
    contrastive_steps: Annotated[int, typer.Option(min=1, help="most contrastive steps (the held-out shot picks "
                                                               "how many)")] = 40,
    selfsup_steps: Annotated[int, typer.Option(min=1, help="masked-LM steps of the selfsup strategy")] = 20,
    seconds: Annotated[float, typer.Option(min=0.001, help="wall-clock cap per strategy")] = 90.0,
    top_layers: TopLayersOpt = None,
    refit: RefitOpt = False,
    batches: BatchesOpt = None,
    seed: Annotated[int, typer.Option(help="seed of the held-out shot and of fine-tuning")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    force: Annotated[bool, typer.Option(help="replace --out even if it is not an output of this command")] = False,
) -> None:
    """Adapt a model to a new domain from its support set (and unlabeled text); `predict`, `evaluate` and
    the registry take the result like any model."""
    from metanlp.adaptation import domain_adapt
    from metanlp.atomic import check_replaceable
    from metanlp.encoder import resolve_device
    from metanlp.learners import load_learner, save_learner
    from metanlp.learners.persistence import SPEC_FILE

    check_replaceable(out, SPEC_FILE, force)

    support_set = load_labelled(support, text_column=text_column, label_column=label_column)
    texts = read_texts(unlabeled) if unlabeled else None
    learner = load_learner(model).to(resolve_device(device))
    budget = _adapt_budget({"finetune_steps": steps, "contrastive_steps": contrastive_steps,
                            "selfsup_steps": selfsup_steps, "seconds": seconds, "top_layers": top_layers,
                            "refit": refit, "seed": seed, "contrastive_batches": batches})
    adapted, summary = domain_adapt(learner, support_set.texts, support_set.labels, texts, _csv(strategy), budget)
    record = {"support": support, "unlabeled": unlabeled, **summary.__dict__}
    save_learner(adapted, out, provenance=learner.provenance.model_copy(update={"adapted": record}), force=force)
    typer.echo(json.dumps(summary.__dict__, default=str))
    typer.echo(f"adapted model written to {out} ({len(support_set)} support examples)")


@app.command()
@cli_errors
def memory(
    model: Annotated[Path, typer.Option(help="a metanlp model (its encoder keys the memory; a memory model "
                                             "keeps what it remembers and adds to it)")],
    out: Annotated[Path, typer.Option(help="directory for the memory model (may be --model: replaced whole)")],
    data: Annotated[list[str] | None, typer.Option(
        help="labelled examples of past tasks (repeatable; each file is a task, or each value of --task-column)")
    ] = None,
    pool: Annotated[Path | None, typer.Option(help="a task pool: its meta_train datasets' label spaces are the "
                                                   "past tasks")] = None,
    served_tasks: Annotated[Path | None, typer.Option(
        help="the --tasks-dir of `metanlp serve`: each task users created there (its support set) is a past task")
    ] = None,
    text_column: TextColumnOpt = "text",
    label_column: LabelColumnOpt = "label",
    task_column: Annotated[str | None, typer.Option(help="--data: a column naming each row's task")] = None,
    capacity: Annotated[int, typer.Option(min=1, help="rows kept; over it the largest (task, label) groups lose "
                                                      "their oldest rows first")] = MemoryConfig().capacity,
    neighbours: Annotated[int, typer.Option(min=0, help="memory rows borrowed per support class (same label)")
                          ] = MemoryConfig().neighbours,
    weight: Annotated[float, typer.Option(min=0, help="a borrowed row's weight in its prototype (support: 1)")
                      ] = MemoryConfig().weight,
    min_similarity: Annotated[float, typer.Option(min=-1, max=1, help="least cosine of a borrowed row to its "
                                                                     "class's support mean")
                              ] = MemoryConfig().min_similarity,
    local_steps: Annotated[int, typer.Option(min=0, help="MbPA local adaptation: head steps per query (0: off)")
                           ] = MemoryConfig().local_steps,
    local_check: Annotated[bool, typer.Option(help="MbPA on a task only if it gets more of the support's "
                                                   "left-out rows right than the prototypes")
                           ] = MemoryConfig().local_check,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    force: Annotated[bool, typer.Option(help="replace --out even if it is not a metanlp model")] = False,
) -> None:
    """Give a model an episodic memory of past tasks' labelled examples: adapting to a new task then borrows
    the nearest remembered examples of the same labels (and, with --local-steps, adapts locally per query)."""
    from metanlp.atomic import check_replaceable
    from metanlp.encoder import resolve_device
    from metanlp.learners import load_learner, save_learner
    from metanlp.learners.memory import MemoryAugmented, with_memory
    from metanlp.learners.persistence import SPEC_FILE

    if out.resolve() != model.resolve():
        check_replaceable(out, SPEC_FILE, force)
    loaded = load_learner(model)
    if not data and pool is None and served_tasks is None and not isinstance(loaded, MemoryAugmented):
        raise DataError("give the past tasks: --data FILE (repeatable), --pool POOL or --served-tasks DIR (a memory "
                        "model needs none to change only its options)")
    tasks: list[tuple[str, LabelledTexts]] = []
    if served_tasks is not None:
        from metanlp.tasks import task_records

        if not served_tasks.is_dir():
            raise DataError(f"--served-tasks {served_tasks}: not a folder (give the --tasks-dir of metanlp serve)")
        records = task_records(served_tasks)
        if not records:
            raise DataError(f"--served-tasks {served_tasks}: no task records (<id>.json) in it")
        seen: set[str] = set()
        for task in records:  # one support set posted under two strategies is one past task
            support = json.dumps([task.texts, task.labels])
            if support not in seen:
                seen.add(support)
                tasks.append((f"served/{task.id}", LabelledTexts(task.texts, task.labels)))
    if pool is not None:
        from metanlp.data.pool import load_spaces, read_pool

        task_pool, root = read_pool(pool)
        tasks += [(s.name, s.data) for e in task_pool.tasks if e.role == "meta_train" for s in load_spaces(e, root)]
    for path in data or []:
        rows = load_labelled(path, text_column=text_column, label_column=label_column,
                             domain_column=task_column or "domain", separate_tasks=bool(task_column))
        if task_column and rows.domains is None:
            raise DataError(f"{path}: has no task column {task_column!r}")
        name = Path(path).stem
        tasks += ([(f"{name}/{t}", rows.select([i for i, d in enumerate(rows.domains) if d == t]))
                   for t in sorted(set(rows.domains))] if task_column else [(name, rows)])
    config = MemoryConfig(capacity=capacity, neighbours=neighbours, weight=weight, min_similarity=min_similarity,
                          local_steps=local_steps, local_check=local_check)
    learner = with_memory(loaded.to(resolve_device(device)), config)
    for name, rows in tasks:
        learner.remember(rows.texts, rows.labels, [name] * len(rows))
    save_learner(learner, out, force=force or out.resolve() == model.resolve())
    kept = len({(t, lab) for t, lab in zip(learner.memory.tasks, learner.memory.labels, strict=True)})
    typer.echo(f"memory of {len(learner.memory)} rows ({kept} task labels, capacity {capacity}) from "
               f"{len(tasks)} tasks; model written to {out}")


@app.command()
@cli_errors
def distil(
    teacher: Annotated[Path, typer.Option(help="the metanlp model to compress")],
    text: Annotated[list[str], typer.Option(help="unlabeled text: .txt (one per line), JSONL/CSV text column, or "
                                                  "'default' (repeatable); keep the datasets you will score out")],
    out: Annotated[Path, typer.Option(help="directory for the student model")],
    layers: Annotated[str | None, typer.Option(help="teacher layers the student keeps, e.g. 1,3,5 (default: "
                                                    "every other one, ending with the top)")] = None,
    steps: Annotated[int, typer.Option(min=1, help="distillation steps")] = DistilConfig().steps,
    lr: Annotated[float, typer.Option(min=0, help="learning rate")] = DistilConfig().lr,
    batch_size: Annotated[int, typer.Option(min=2, help="texts per step")] = DistilConfig().batch_size,
    similarity_weight: Annotated[float, typer.Option(min=0, help="weight of the pairwise-similarity term")
                                 ] = DistilConfig().similarity_weight,
    hidden_weight: Annotated[float, typer.Option(min=0, help="weight of each kept layer's token states against "
                                                            "the teacher's at that layer (0: off)")
                             ] = DistilConfig().hidden_weight,
    per_text: Annotated[int | None, typer.Option(min=1, help="at most this many sentences from each --text "
                                                            "(a seeded sample), so no one source dominates")
                        ] = None,
    seed: Annotated[int, typer.Option(help="seed of the batches, dropout and --per-text samples")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    force: Annotated[bool, typer.Option(help="replace --out even if it is not an output of this command")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Distil a model into a student with fewer encoder layers, trained on unlabeled text to give the teacher's
    embeddings; the student is a normal model for predict, evaluate, benchmark and serve."""
    from metanlp.atomic import check_replaceable
    from metanlp.distillation import distil as distil_model
    from metanlp.learners import load_learner, save_learner
    from metanlp.learners.persistence import SPEC_FILE
    from metanlp.pretrain import unlabeled_sentences

    check_replaceable(out, SPEC_FILE, force)
    config = DistilConfig(layers=_ints(layers, "--layers", least=0) if layers else None, steps=steps, lr=lr,
                          batch_size=batch_size, similarity_weight=similarity_weight,
                          hidden_weight=hidden_weight, seed=seed)
    model = load_learner(teacher)
    student, summary = distil_model(model, unlabeled_sentences(text, per_text, seed), config, device, not quiet)
    record = {"teacher": str(teacher), "text": text, "per_text": per_text, **summary}
    save_learner(student, out, provenance=model.provenance.model_copy(update={"distilled": record}), force=force)
    typer.echo(f"student with layers {summary['layers']} of {summary['teacher_layers']}: distillation loss "
               f"{summary['loss_first']:.4f} -> {summary['loss_last20']:.4f} in {summary['seconds']:.0f} s; "
               f"written to {out}")


@app.command()
@cli_errors
def average(
    model: Annotated[list[Path], typer.Option(help="a metanlp model folder (repeat: at least two of one learner "
                                                   "and encoder, e.g. the same training with other seeds)")],
    out: Annotated[Path, typer.Option(help="folder for the averaged model")],
    force: Annotated[bool, typer.Option(help="replace --out even if it is not an output of this command")] = False,
) -> None:
    """Average models' weights into one model of the same size (a model soup): trained from the same start with
    other seeds, the mean is often better than each and costs nothing at prediction."""
    from metanlp.atomic import check_replaceable
    from metanlp.learners import save_learner
    from metanlp.learners.averaging import average_learners
    from metanlp.learners.persistence import SPEC_FILE

    check_replaceable(out, SPEC_FILE, force)
    save_learner(average_learners(model), out, force=force)
    typer.echo(f"the mean of {len(model)} models' weights written to {out}")


def _model_option(value: str) -> tuple[str, Path]:
    name, _, path = value.rpartition("=")
    if not path:
        raise DataError(f"--model {value!r}: give NAME=DIR or DIR")
    return (name or Path(path).name), Path(path)


def _seen_datasets(model: Path, pool, root: Path, scored_classes: dict[str, set[str]]) -> list[str]:
    """The pool's eval datasets whose rows the model may have meta-trained or validated on: the same file and a
    label space in common (ARSC's source and target tasks share a file but not a task; CLINC150's held-out domains
    share it but not a class); for a model trained on a class split, the same file with classes in common
    (`scored_classes`: dataset -> the classes the suite scores)."""
    from metanlp.data.pool import dataset_path, load_spaces
    from metanlp.learners import read_spec

    provenance = read_spec(model).provenance
    if provenance.pool is None:
        trained = {Path(provenance.train_data).resolve()} if provenance.train_data else set()
        used = set((provenance.classes or {}).get("train", [])) | set((provenance.classes or {}).get("val", []))
        return [e.name for e in pool.tasks if e.role == "eval"
                and Path(dataset_path(e, root, "train")).resolve() in trained
                and (not provenance.classes or used & scored_classes.get(e.name, set()))]
    model_root = Path(provenance.train_data or ".").resolve().parent

    def train_file(entry, entry_root: Path) -> Path:
        return Path(dataset_path(entry, entry_root, "train")).resolve()

    read: dict[tuple[int, bool], set[tuple[str, str]]] = {}  # each entry's rows are read once

    def selected(entry, entry_root: Path, by_task: bool) -> set[tuple[str, str]]:
        # (task, class) pairs the entry's filters keep; the task only when both entries split by one
        key = (id(entry), by_task)
        if key not in read:
            read[key] = {(space.name.removeprefix(entry.name) if by_task else "", label)
                         for space in load_spaces(entry, entry_root, "train") for label in space.data.classes}
        return read[key]

    def shares_a_space(e, u) -> bool:
        if train_file(u, model_root) != train_file(e, root):
            return False
        by_task = bool(e.task_column and u.task_column)
        return bool(selected(e, root, by_task) & selected(u, model_root, by_task))

    used = [u for u in provenance.pool.tasks if u.role != "eval"]
    return [e.name for e in pool.tasks if e.role == "eval" and any(shares_a_space(e, u) for u in used)]


@app.command()
@cli_errors
def benchmark(
    pool: Annotated[Path, typer.Option(help="task pool whose `eval` datasets are scored (train file: supports, "
                                            "test file: queries)")],
    model: Annotated[list[str] | None, typer.Option(
        help="NAME=DIR of a metanlp model (repeatable): rows NAME (its own adaptation) and NAME+logreg (unless "
             "--no-model-logreg)")] = None,
    methods: Annotated[str, typer.Option(help="baselines on the base encoder: frozen, logreg, finetune, setfit "
                                              "(setfit needs the peers extra)")] = "frozen,logreg,finetune",
    shots: Annotated[str, typer.Option(help="K values (2- and 3-class sets also get 16)")] = "5,10",
    draws: Annotated[int, typer.Option(min=1, help="support draws per K")] = 3,
    max_queries: Annotated[int, typer.Option(min=1, help="a seeded sample of at most this many test rows")] = 2000,
    datasets: Annotated[str | None, typer.Option(help="only these eval datasets (comma-separated)")] = None,
    encoder: Annotated[str, typer.Option(help="base encoder of the baselines")] = DEFAULT_ENCODER,
    setfit_iterations: Annotated[int, typer.Option(min=1, help="SetFit's num_iterations (documented default 20)")] = 20,
    reuse: Annotated[Path | None, typer.Option(help="an earlier suite JSON of the same supports: its rows of the "
                                                    "methods in --reuse-methods are taken, not rerun")] = None,
    reuse_methods: Annotated[str, typer.Option(help="methods whose rows --reuse supplies")] = "setfit",
    seed: Annotated[int, typer.Option(help="seed of the supports and query samples")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    out: Annotated[Path, typer.Option(help="results path; .json, .md and .png are written")] = Path(
        "results/suite.json"),
    model_logreg: Annotated[bool, typer.Option(help="also score each --model's encoder with a logistic-regression "
                                                    "head (rows NAME+logreg)")] = True,
    adapt: Annotated[list[str] | None, typer.Option(
        help="adaptation strategies (comma-separated, applied together) run on each --model and the frozen "
             "encoder before their own adaptation, e.g. contrastive or transductive (repeatable): rows "
             "NAME+STRATEGIES")] = None,
    proportion_rows: Annotated[int | None, typer.Option(
        min=0, help="transductive: estimate the queries' class proportions when there are at least this many per "
                    "class (0: assume them equal; default: the adaptation budget's, 50)")] = None,
    adapt_seconds: Annotated[float | None, typer.Option(
        min=0.001, help="wall-clock cap per encoder strategy and support set (contrastive, finetune, selfsup), its "
                        "step choice included (default: the adaptation budget's, 90)")] = None,
    adapt_top_layers: TopLayersOpt = None,
    adapt_refit: RefitOpt = False,
    adapt_batches: BatchesOpt = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """The benchmark suite: every method on the same supports and queries of the pool's eval datasets; accuracy
    with 95% CIs, paired differences to frozen and to SetFit, adaptation seconds per support set."""
    from metanlp.adaptation import DomainAdaptedLearner, check_strategies
    from metanlp.config import learner_config
    from metanlp.data.pool import read_pool
    from metanlp.encoder import TextEncoder, resolve_device
    from metanlp.learners import build_learner, load_learner
    from metanlp.reporting import write_suite_report
    from metanlp.suite import run_suite, suite_support_sets

    task_pool, root = read_pool(pool)
    models = dict(_model_option(m) for m in model or [])
    baselines = _csv(methods)
    unknown = sorted(set(baselines) - {"frozen", "logreg", "finetune", "setfit"})
    if unknown:
        raise DataError(f"--methods: unknown {unknown}; choose from frozen, logreg, finetune, setfit")
    names = _csv(datasets) if datasets else None
    sets = suite_support_sets(task_pool, root, _ints(shots, "--shots"), draws, max_queries, seed, names)
    if not sets:
        raise DataError(f"{pool}: no eval dataset{' among ' + str(names) if names else ''} to score")
    notes = [f"supports from each eval dataset's train file, K per class (a class with fewer gives all it has: "
             f"'short'), {draws} draws (a fixed support such as ARSC's is drawn once); queries: at most "
             f"{max_queries} test rows, the same for every method"]
    scored_classes: dict[str, set[str]] = {}
    for item in sets:
        scored_classes.setdefault(item.dataset, set()).update(item.support.classes)
    for name, directory in models.items():
        seen = sorted(_seen_datasets(directory, task_pool, root, scored_classes))
        if seen:
            report("warning", f"model {name} was meta-trained on eval datasets {seen}: not held out")
            notes.append(f"{name} was meta-trained on {seen}: those rows are not transfer")
    target = resolve_device(device)
    base = EncoderConfig(name_or_path=encoder)
    shared: dict[str, TextEncoder] = {}

    def base_encoder() -> TextEncoder:
        if "encoder" not in shared:
            shared["encoder"] = TextEncoder.from_config(base).to(target)
        return shared["encoder"]

    factories = {}
    for kind in baselines:
        options = {"num_iterations": setfit_iterations} if kind == "setfit" else {}
        factories[kind] = (lambda kind=kind, options=options: build_learner(learner_config(kind, **options),
                                                                            base_encoder()))
    if "setfit" in baselines and setfit_iterations != 20:
        notes.append(f"SetFit ran with num_iterations={setfit_iterations} (documented default 20) to fit the CPU")
    for name, directory in models.items():
        loaded: dict = {}

        def own(directory=directory, loaded=loaded):
            loaded.setdefault("model", load_learner(directory).to(target))
            return loaded["model"]

        factories[name] = own
        if model_logreg:
            factories[f"{name}+logreg"] = lambda own=own: build_learner("logreg", own().encoder)
    # each adaptation combination on each model, and on the frozen encoder (is the meta-learned start worth it?)
    given = {"transductive_proportion_rows": proportion_rows, "seconds": adapt_seconds,
             "top_layers": adapt_top_layers, "refit": adapt_refit, "contrastive_batches": adapt_batches}
    budget = _adapt_budget(given)
    for combination in adapt or []:
        strategies = _csv(combination)
        check_strategies(strategies)
        for name in [*models, *(["frozen"] if "frozen" in baselines else [])]:
            factories[f"{name}+{'+'.join(strategies)}"] = (
                lambda start=factories[name], strategies=strategies: DomainAdaptedLearner(start(), strategies, budget))
    previous = None
    if reuse is not None:
        import json as _json

        kept = set(_csv(reuse_methods))
        previous = {}
        for row in _json.loads(reuse.read_text())["rows"]:
            if row["method"] in kept:
                previous.setdefault(row["method"], {})[row["key"]] = row
        notes.append(f"rows of {sorted(kept)} reused from {reuse} (same supports and queries)")
    results = run_suite(factories, sets, seed, show_progress=not quiet, reuse=previous)
    results["notes"] = notes
    results["config"] = {"pool": str(pool), "models": {k: str(v) for k, v in models.items()}, "methods": baselines,
                         "shots": shots, "draws": draws, "max_queries": max_queries, "seed": seed,
                         "setfit_iterations": setfit_iterations, "datasets": names, "adapt": adapt or [],
                         "transductive_proportion_rows": budget.transductive_proportion_rows,
                         "adapt_seconds": budget.seconds, "adapt_top_layers": budget.top_layers,
                         "adapt_refit": budget.refit, "adapt_batches": budget.contrastive_batches}
    paths = write_suite_report(results, out)
    typer.echo(paths["markdown"].read_text())
    typer.echo(f"wrote {', '.join(str(p) for p in paths.values())}")


@app.command()
@cli_errors
def serve(
    model: Annotated[str, typer.Option(help="a metanlp model folder, or a registry URI such as "
                                            "models:/metanlp-classifier@champion")],
    host: Annotated[str, typer.Option(help="interface to bind (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="port to listen on")] = 8000,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI for models:/ (default: "
                                                          "MLFLOW_TRACKING_URI, then mlflow/ here)")] = None,
    tasks_dir: Annotated[Path | None, typer.Option(help="keep task records here so a restart keeps them")] = None,
    cache_size: Annotated[int, typer.Option(min=1, help="adapted tasks kept in memory (LRU)")] = 64,
    max_rows: Annotated[int, typer.Option(min=1, help="most support rows or texts in one request")] = 1000,
    max_chars: Annotated[int, typer.Option(min=1, help="most characters in one text or label")] = 2000,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="largest request body")] = 2_000_000,
    max_adapt_seconds: Annotated[float, typer.Option(min=0.001, help="most seconds a task may ask for its "
                                                                     "contrastive tuning (adapt_seconds)")] = 300.0,
    poll_seconds: Annotated[float, typer.Option(min=0, help="how often to look at the registry alias "
                                                            "(0: never)")] = 30.0,
) -> None:
    """Serve few-shot classification with cached tasks: POST /tasks, POST /tasks/{id}/predict, /docs."""
    import uvicorn

    from metanlp.service import Limits, create_app, open_model
    from metanlp.tasks import TaskStore

    source = open_model(model, tracking_uri)
    store = TaskStore(cache_size, tasks_dir)
    limits = Limits(max_rows, max_chars, max_body_bytes, max_adapt_seconds)
    application = create_app(source, store, limits, poll_seconds)
    err_console.print(f"serving {model} (version {source.current}) on http://{host}:{port} (docs at /docs)")
    uvicorn.run(application, host=host, port=port, log_level="warning")


ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml of the pipeline; its folder is the root")]


@app.command()
@cli_errors
def run(params: ParamsOpt = Path("params.yaml")) -> None:
    """The main job: the whole pipeline as a Prefect flow (validate, build_corpus, pretrain, tune, meta_train,
    evaluate, register, summary), each stage cached by content, on the corpus params.yaml names (the embedded
    default); ends with the run's summary."""
    from metanlp.pipeline import build_flow

    root = params.resolve().parent
    load_params(params)
    apply_environment_defaults(root)
    results = build_flow()(params_file=str(params.resolve()), root=str(root))
    typer.echo(results["summary"]["text"])


@app.command()
@cli_errors
def stage(
    name: Annotated[str, typer.Argument(help="a stage of the pipeline: validate, build_corpus, pretrain, tune, "
                                             "meta_train, evaluate, register or summary")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Run one pipeline stage alone (this is what dvc.yaml calls)."""
    from metanlp.pipeline import run_stage
    from metanlp.runtime import project_lock

    with project_lock(params.resolve().parent, f"`metanlp stage {name}`"):
        result = run_stage(name, str(params.resolve()), str(params.resolve().parent))
    typer.echo(json.dumps(result, indent=2, default=str))


@app.command()
@cli_errors
def tune(
    params: ParamsOpt = Path("params.yaml"),
    workers: Annotated[int, typer.Option(min=1, help="local worker processes sharing the study")] = 1,
    worker: Annotated[int, typer.Option(min=0, help="this process's index among the workers (its sampler's seed is "
                                                    "tune.seed + worker): give each machine its own")] = 0,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Tune alone: the tune stage's Optuna study, shared by every worker that runs this command on the same
    tune.storage (--workers N here, or the same command on several machines with --worker 1, 2, ...);
    tune.trials is the budget of the whole study. Needs the stages before it (metanlp stage validate, ...)."""
    import subprocess

    from metanlp.stages import tune as tune_stage

    config = load_params(params)
    root = params.resolve().parent
    apply_environment_defaults(root)
    if workers > 1:
        tune_stage.prepare(config, root)
    helpers = [subprocess.Popen([sys.executable, "-m", "metanlp.cli", "tune", "--params", str(params.resolve()),
                                 "--worker", str(worker + index), "--quiet"])
               for index in range(1, workers)]
    try:
        record = tune_stage.run(config, root, show_progress=not quiet, worker=worker)
    finally:
        failed = [helper.args for helper in helpers if helper.wait() != 0]
    if failed:
        raise StageError(f"{len(failed)} of {workers} tune workers failed (see their messages above)")
    if helpers:  # they may have finished trials after this worker: the whole study's best, now
        record = tune_stage.run(config, root, show_progress=False, worker=worker)
    typer.echo(json.dumps(record, indent=2, default=str))


@app.command("dvc-yaml")
@cli_errors
def dvc_yaml_command(
    out: Annotated[Path, typer.Option(help="where to write it")] = Path("dvc.yaml"),
    check: Annotated[bool, typer.Option(help="only check that OUT matches the stage declarations")] = False,
    params_file: Annotated[Path, typer.Option("--params", help="the params.yaml whose files (a task pool's "
                                              "datasets, pretraining text) the stages also depend on")
                           ] = Path("params.yaml"),
) -> None:
    """Write dvc.yaml from the stage declarations (or check the one there), so DVC runs what `metanlp run` runs."""
    from metanlp.stages import dvc_yaml, load_params

    expected = dvc_yaml(load_params(params_file), out.resolve().parent)
    if check:
        if not out.exists() or out.read_text() != expected:
            raise DataError(f"{out} does not match the stage declarations; run `metanlp dvc-yaml` to rewrite it")
        typer.echo(f"{out} matches the stage declarations")
        return
    out.write_text(expected)
    typer.echo(f"wrote {out}")


@app.command()
@cli_errors
def promote(
    name: Annotated[str, typer.Argument(help="registered model name")],
    version: Annotated[str, typer.Argument(help="the version to make champion")],
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: params.yaml's, "
                                                          "then MLFLOW_TRACKING_URI, then mlflow/ here)")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Promote a registered version to champion by hand."""
    from metanlp.runtime import project_lock
    from metanlp.stages.register import promote as promote_version

    root = params.resolve().parent
    configured = tracking_uri or (load_params(params).register_.tracking_uri if params.exists() else None)
    with project_lock(root, f"`metanlp promote {name} {version}`", wait_seconds=120):  # one promotion at a time
        typer.echo(promote_version(name, version, configured, root))


@app.command()
@cli_errors
def schedule(
    cron: Annotated[str, typer.Option(help="cron expression, e.g. '0 3 * * 0' (Sundays 03:00)")] = "0 3 * * 0",
    job: Annotated[Literal["retrain", "score"], typer.Option(
        help="retrain: the whole pipeline; score: label --texts into --out with --model adapted to --support")
    ] = "retrain",
    params: ParamsOpt = Path("params.yaml"),
    name: Annotated[str | None, typer.Option(help="deployment name (default: the job's name)")] = None,
    timezone: Annotated[str, typer.Option(help="timezone of the cron expression")] = "UTC",
    model: Annotated[str | None, typer.Option(help="score: a model folder or models:/NAME@ALIAS")] = None,
    support: Annotated[str | None, typer.Option(help="score: labelled examples")] = None,
    texts: Annotated[str | None, typer.Option(help="score: the file of texts to label")] = None,
    out: Annotated[str | None, typer.Option(help="score: the .csv or .jsonl written (replaced each run)")] = None,
    serve: Annotated[bool, typer.Option(help="keep running and execute the scheduled runs (a Prefect runner); "
                                             "--no-serve only registers the deployment")] = True,
    pool: Annotated[str | None, typer.Option(
        help="deploy to this Prefect process work pool (created if missing) instead of serving here: "
             "`prefect worker start --pool NAME` on any machine with metanlp installed runs it")] = None,
) -> None:
    """Create a scheduled deployment (retraining, or batch scoring) on the Prefect server PREFECT_API_URL
    points at."""
    from metanlp.pipeline import deployment, ensure_work_pool
    from metanlp.scoring import check_output

    root = params.resolve().parent
    if job == "retrain":
        load_params(params)
        parameters = {"params_file": str(params.resolve()), "root": str(root)}
    else:
        given = {"model": model, "support": support, "texts": texts, "out": out}
        if missing := [f"--{key}" for key, value in given.items() if not value]:
            raise DataError(f"--job score needs {', '.join(missing)}")
        check_output(Path(out))
        parameters = {key: value if key == "model" and value.startswith("models:/") else str(Path(value).resolve())
                      for key, value in given.items()}
        if model.startswith("models:/"):  # the runner may start elsewhere: fix the registry it reads now
            from metanlp.tracking import tracking_uri

            configured = load_params(params).register_.tracking_uri if params.exists() else None
            parameters["tracking_uri"] = tracking_uri(configured, root)
    apply_environment_defaults(root)
    if not os.environ.get("PREFECT_API_URL"):
        raise DataError("schedules need a running Prefect server: start `prefect server start` and set "
                        "PREFECT_API_URL=http://127.0.0.1:4200/api")
    name = name or job
    scheduled = deployment(job, name, cron, timezone, parameters, pool)
    if pool is not None and ensure_work_pool(pool):
        typer.echo(f"created process work pool {pool!r}")
    deployment_id = scheduled.apply()
    typer.echo(f"deployment {scheduled.flow_name}/{name} ({deployment_id}) scheduled '{cron}' {timezone}")
    if pool is not None:
        typer.echo(f"its runs wait for a worker: prefect worker start --pool {pool}")
    elif serve:
        from prefect import serve as serve_deployments

        serve_deployments(scheduled)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
