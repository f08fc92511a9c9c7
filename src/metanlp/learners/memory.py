"""Memory-augmented adaptation: an episodic memory of labelled examples from past tasks, used when a new task
is adapted.

The memory holds (key, text, label, task) rows: the key is the encoder's embedding of the text. At adaptation
the learner (`MemoryAugmented`, ProtoNet's rule) looks up, for each support class, the memory rows with the
same label whose keys are nearest the class's support mean (at least `min_similarity` cosine), and counts them
in the prototype at `weight` each: a new domain of a known kind (a product area of sentiment, a new bank's
intents) borrows examples from the old ones. With `local_steps`, it then adapts locally as MbPA does
(Sprechmann et al., 2018): for each query, a few gradient steps of the cosine head on the query's nearest
labelled rows (support and retrieved memory), pulled toward the prototypes by an L2 term, before predicting.
With `local_check` (the default) a task uses it only if, on its own support set, it classifies more left-out
rows right than the prototypes do (each row left out of its prototype and of the neighbours); local steps that
fit neighbourhoods of many fine classes cost accuracy, and this shows on the support. A label the memory has
never seen falls back to the support set alone.

Bound and eviction: at most `capacity` rows. When an addition goes over it, rows are evicted from the largest
(task, label) groups first, oldest first: every group larger than a common cap is cut to it, keeping its newest
rows, the cap being the largest that fits (slots left over go one each to the groups cut, those added to most
recently first). So one big past task cannot push the others out, and a full memory keeps what is recent.

Saved beside the model in `memory/`: `keys.safetensors` (keys and insertion order), `entries.parquet` (text,
label, task) and `memory.json` (capacity, the digest of the encoder weights the keys were computed with).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from metanlp.config import MemoryConfig, Provenance, uses_label_names
from metanlp.data.load import DataError
from metanlp.encoder import TextEncoder, TokenizedTexts
from metanlp.learners.base import Classifier, Learner, support_targets
from metanlp.learners.protonet import ProtoNet, prototype_logits

MEMORY_DIR = "memory"
KEYS_FILE, ENTRIES_FILE, META_FILE = "keys.safetensors", "entries.parquet", "memory.json"


def encoder_digest(encoder: TextEncoder) -> str:
    """sha256 of the encoder's weights: memory keys are only valid for the weights that computed them."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def eviction_keep(groups: np.ndarray, order: np.ndarray, capacity: int) -> np.ndarray:
    """Rows kept (sorted indices) when `capacity` rows of these (group id, insertion order) rows fit: groups
    above a common cap are cut to it, newest rows kept; leftover slots go to the cut groups, most recent first."""
    if len(groups) <= capacity:
        return np.arange(len(groups))
    names, group_of, counts = np.unique(groups, return_inverse=True, return_counts=True)
    cap = 0
    while np.minimum(counts, cap + 1).sum() <= capacity:
        cap += 1
    quota = np.minimum(counts, cap)
    cut = np.flatnonzero(counts > cap)
    newest = np.array([order[group_of == g].max() for g in cut])
    for g in cut[np.argsort(-newest, kind="stable")][: capacity - int(quota.sum())]:
        quota[g] += 1
    keep = []
    for g in range(len(names)):
        rows = np.flatnonzero(group_of == g)
        keep.extend(rows[np.argsort(-order[rows], kind="stable")][: quota[g]].tolist())
    return np.sort(np.asarray(keep, dtype=np.int64))


@dataclass
class EpisodicMemory:
    """Labelled rows from past tasks, keyed by their embeddings; at most `capacity` of them."""

    capacity: int
    keys: torch.Tensor  # [rows, dim] embeddings as the encoder gives them
    texts: list[str]
    labels: list[str]
    tasks: list[str]
    order: np.ndarray  # insertion counter of each row: eviction drops the oldest of a group first
    encoder_sha256: str | None = None

    @classmethod
    def empty(cls, capacity: int, dim: int) -> EpisodicMemory:
        return cls(capacity, torch.empty(0, dim), [], [], [], np.empty(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, keys: torch.Tensor, texts: list[str], labels: list[str], tasks: list[str]) -> None:
        """Append rows (then evict down to the capacity, see the module's doc)."""
        if not len(texts) == len(labels) == len(tasks) == keys.shape[0]:
            raise ValueError("memory rows: keys, texts, labels and tasks differ in length")
        start = int(self.order.max()) + 1 if len(self.order) else 0
        self.keys = torch.cat([self.keys, keys.detach().float().cpu()])
        self.texts, self.labels = self.texts + list(texts), self.labels + list(labels)
        self.tasks = self.tasks + list(tasks)
        self.order = np.concatenate([self.order, np.arange(start, start + len(texts))])
        self.resize(self.capacity)

    def resize(self, capacity: int) -> None:
        """Set the bound and evict down to it (see the module's doc)."""
        self.capacity = capacity
        groups = np.array([f"{t}\x00{lab}" for t, lab in zip(self.tasks, self.labels, strict=True)])
        keep = eviction_keep(groups, self.order, capacity)
        if len(keep) < len(self.texts):
            self.keys = self.keys[torch.as_tensor(keep)]
            self.texts, self.labels, self.tasks = ([values[i] for i in keep]
                                                   for values in (self.texts, self.labels, self.tasks))
            self.order = self.order[keep]

    def _top(self, queries: torch.Tensor, k: int, allowed: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The k rows most cosine-similar to each query among its `allowed` ones ([rows] or [queries, rows]);
        -inf where fewer qualify."""
        similarity = F.normalize(queries.float(), dim=-1) @ F.normalize(self.keys, dim=-1).T
        similarity = similarity.masked_fill(~torch.as_tensor(allowed), float("-inf"))  # broadcasts over queries
        values, indices = similarity.topk(min(k, len(self)), dim=-1)
        return indices, values

    def nearest(self, queries: torch.Tensor, k: int, labels: list[str] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices and cosine similarities of the k rows nearest each query, best first, among the rows whose
        label is in `labels` (all rows when None); fewer columns when fewer rows qualify."""
        allowed = np.ones(len(self), dtype=bool) if labels is None else np.isin(self.labels, list(labels))
        k = min(k, int(allowed.sum()))
        if k == 0:
            return torch.empty(len(queries), 0, dtype=torch.long), torch.empty(len(queries), 0)
        return self._top(queries, k, allowed)

    def nearest_of_label(self, queries: torch.Tensor, labels: list[str], k: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Row i: the k rows labelled `labels[i]` nearest `queries[i]`, best first; one similarity pass for all
        queries. A row's similarity is -inf where fewer than k rows have its label."""
        return self._top(queries, k, np.asarray(self.labels)[None, :] == np.asarray(labels)[:, None])

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"keys": self.keys.contiguous(), "order": torch.as_tensor(self.order, dtype=torch.int64)},
                  str(directory / KEYS_FILE))
        pd.DataFrame({"text": self.texts, "label": self.labels, "task": self.tasks}).to_parquet(
            directory / ENTRIES_FILE, index=False)
        (directory / META_FILE).write_text(json.dumps({
            "capacity": self.capacity, "rows": len(self), "dim": int(self.keys.shape[1]),
            "encoder_sha256": self.encoder_sha256,
            "eviction": "largest (task, label) groups first, oldest first"}, indent=2))

    @classmethod
    def load(cls, directory: Path, dim: int) -> EpisodicMemory:
        try:
            meta = json.loads((directory / META_FILE).read_text())
            tensors = load_file(str(directory / KEYS_FILE))
            entries = pd.read_parquet(directory / ENTRIES_FILE)
        except (OSError, ValueError, SafetensorError) as err:
            raise DataError(f"{directory}: not a readable episodic memory ({err})") from err
        keys, order = tensors.get("keys"), tensors.get("order")
        columns_ok = {"text", "label", "task"} <= set(entries.columns)
        if keys is None or order is None or not columns_ok or keys.ndim != 2 or keys.shape[1] != dim \
                or not keys.shape[0] == len(order) == len(entries):
            raise DataError(f"{directory}: its keys, order and entries do not agree (or are not {dim}-dimensional)")
        return cls(int(meta["capacity"]), keys.float(), entries["text"].astype(str).tolist(),
                   entries["label"].astype(str).tolist(), entries["task"].astype(str).tolist(),
                   order.numpy().astype(np.int64), meta.get("encoder_sha256"))


class MemoryAugmented(ProtoNet):
    """ProtoNet whose prototypes borrow label-matched neighbours from an episodic memory (and, with
    `local_steps`, MbPA-style local adaptation per query). Built from a trained model by `metanlp memory`."""

    meta_trainable = False
    saved_beside = (MEMORY_DIR,)  # its config fixes label_prior at 0: no base rates

    def __init__(self, encoder: TextEncoder, config: MemoryConfig | None = None,
                 provenance: Provenance | None = None) -> None:
        super().__init__(encoder, config or MemoryConfig(), provenance)
        self.memory = EpisodicMemory.empty(self.config.capacity, encoder.dim)

    def remember(self, texts: list[str], labels: list[str], tasks: list[str], batch_size: int = 128) -> None:
        """Add labelled rows of past tasks, keyed by this encoder."""
        keys = self.encoder.embed(self.encoder.tokenize(list(texts)), batch_size=batch_size)
        self.memory.add(keys, list(texts), list(labels), list(tasks))

    def save_extra(self, directory: Path) -> None:
        # The keys are written with the weights that computed them (the encoder is not trained while it has a
        # memory): their digest is taken once here, not at every `remember`.
        self.memory.encoder_sha256 = encoder_digest(self.encoder) if len(self.memory) else None
        self.memory.save(directory / MEMORY_DIR)

    def load_extra(self, directory: Path) -> None:
        folder = directory / MEMORY_DIR
        if not folder.is_dir():
            return  # a memory learner with nothing remembered yet
        memory = EpisodicMemory.load(folder, self.encoder.dim)
        if len(memory) and memory.encoder_sha256 != encoder_digest(self.encoder):
            raise DataError(f"{folder}: its keys were computed by other encoder weights than this model's; "
                            "rebuild it with `metanlp memory`")
        memory.resize(self.config.capacity)
        self.memory = memory

    def _neighbours(self, support: torch.Tensor, targets: torch.Tensor, classes: list[str]):
        """Memory rows for each class: the `neighbours` nearest its support mean, same label, similar enough."""
        if not len(self.memory) or not self.config.neighbours:
            return torch.empty(0, support.shape[1]), torch.empty(0, dtype=torch.long)
        means = torch.stack([support[targets == c].mean(dim=0) for c in range(len(classes))])
        indices, similarity = self.memory.nearest_of_label(means, classes, self.config.neighbours)
        chosen = similarity >= self.config.min_similarity  # also drops the -inf of a class with too few rows
        return self.memory.keys[indices[chosen]], chosen.nonzero()[:, 0]

    def adapt(self, support, labels) -> Classifier:
        classes, targets = support_targets(list(labels))
        embedded = self.encoder.embed(self.tokens(support))
        borrowed, borrowed_targets = self._neighbours(embedded, targets, classes)
        weights = torch.cat([torch.ones(len(targets)), torch.full((len(borrowed_targets),), self.config.weight)])
        context, context_targets = torch.cat([embedded, borrowed]), torch.cat([targets, borrowed_targets])
        members = F.one_hot(context_targets, len(classes)).T.float() * weights
        protos = (members @ context) / members.sum(dim=1, keepdim=True)
        if uses_label_names(self.config):
            protos = self.with_label_names(protos, classes, members.sum(dim=1), embedded.norm(dim=-1).mean())
        scale = self.log_scale.detach().exp().cpu()
        local = bool(self.config.local_steps) and (
            not self.config.local_check or local_adaptation_helps(members, context, context_targets, len(targets),
                                                                  scale, self.config))
        return self.restore(classes, {"prototypes": protos, "scale": scale, "context": context,
                                      "context_targets": context_targets, "local": torch.tensor(float(local))})

    def restore(self, classes: list[str], state: dict[str, torch.Tensor]) -> Classifier:
        expected = {"prototypes", "scale", "context", "context_targets", "local"}
        if set(state) != expected or tuple(state["prototypes"].shape) != (len(classes), self.encoder.dim) \
                or state["context"].ndim != 2 or state["context"].shape[0] != state["context_targets"].shape[0]:
            raise DataError(f"adapted state: not a memory learner's {sorted(expected)} for {len(classes)} classes")
        protos, scale = state["prototypes"].float(), state["scale"].float()
        context, context_targets = state["context"].float(), state["context_targets"].long()
        config = self.config
        local = bool(config.local_steps) and bool(state["local"])

        def logits(queries: TokenizedTexts) -> torch.Tensor:
            embedded = self.encoder.embed(queries)
            if not local:
                return prototype_logits(embedded, protos, config.distance, scale)
            return torch.cat([local_adaptation_logits(chunk, protos, context, context_targets, scale, config)
                              for chunk in embedded.split(256)])

        return Classifier(classes, self.encoder, logits, state)


def local_adaptation_helps(members: torch.Tensor, context: torch.Tensor, context_targets: torch.Tensor,
                           support: int, scale: torch.Tensor, config: MemoryConfig) -> bool:
    """Whether MbPA classifies more of the support's rows right than the prototypes, each row left out of its
    class's prototype and of its own neighbours. members: [classes, context] weights the prototypes were made
    with; the first `support` context rows are the support set. A row whose class has no other row (given or
    borrowed) is not scored; with none left (one shot, nothing borrowed) there is nothing to check on: False.
    Label-name rows, when the learner adds them, move both rules' prototypes alike and are left out here."""
    targets = context_targets[:support]
    mass = members.sum(dim=1)
    own_weight = members[targets, torch.arange(support)]
    usable = (mass[targets] - own_weight) > 0
    if not bool(usable.any()):
        return False
    rows, own = torch.arange(support)[usable], targets[usable]
    sums = members @ context
    # per left-out row: every prototype, its own class's without it
    protos = (sums / mass[:, None]).expand(len(rows), -1, -1).clone()
    protos[torch.arange(len(rows)), own] = (sums[own] - own_weight[rows, None] * context[rows]) / (
        mass[own] - own_weight[rows])[:, None]
    queries = context[rows]
    plain = torch.cat([prototype_logits(query[None], own_protos, config.distance, scale)
                       for query, own_protos in zip(queries, protos, strict=True)])
    local = local_adaptation_logits(queries, protos, context, context_targets, scale, config, exclude=rows)
    return int((local.argmax(-1) == own).sum()) > int((plain.argmax(-1) == own).sum())


def local_adaptation_logits(queries: torch.Tensor, protos: torch.Tensor, context: torch.Tensor,
                            context_targets: torch.Tensor, scale: torch.Tensor, config: MemoryConfig,
                            exclude: torch.Tensor | None = None) -> torch.Tensor:
    """MbPA on the cosine head: per query, `local_steps` of gradient descent on its `local_neighbours` nearest
    context rows, with an L2 pull of weight `local_l2` toward the prototypes; then the query's logits.
    protos: [classes, dim], or [queries, classes, dim] for prototypes of each query's own; exclude: per query,
    a context row it may not take as a neighbour (itself, when the support is checked)."""
    with torch.enable_grad():
        unit_context = F.normalize(context, dim=-1)
        unit_queries = F.normalize(queries, dim=-1)
        similarity = unit_queries @ unit_context.T
        if exclude is not None:
            similarity[torch.arange(len(queries)), exclude] = -torch.inf
        k = min(config.local_neighbours, len(context) - (exclude is not None))
        nearest = similarity.topk(k, dim=-1).indices  # [queries, k]
        rows, targets = unit_context[nearest], context_targets[nearest]  # [queries, k, dim], [queries, k]
        start = F.normalize(protos, dim=-1).expand(len(queries), -1, -1)  # [queries, classes, dim]
        head = start.clone().requires_grad_()
        for _ in range(config.local_steps):
            local = scale * torch.einsum("qkd,qcd->qkc", rows, head)
            loss = F.cross_entropy(local.reshape(-1, local.shape[-1]), targets.reshape(-1), reduction="sum") / k
            loss = loss + 0.5 * config.local_l2 * (head - start).pow(2).sum()
            (grad,) = torch.autograd.grad(loss, head)
            head = (head - config.local_lr * grad).detach().requires_grad_()
    return (scale * torch.einsum("qd,qcd->qc", unit_queries, head)).detach()


def with_memory(learner: ProtoNet | Learner, config: MemoryConfig) -> MemoryAugmented:
    """A memory learner on `learner`'s encoder (and its temperature, when it has one); a memory learner keeps
    its memory under the new options (capacity applied now)."""
    augmented = MemoryAugmented(learner.encoder, config, learner.provenance)
    if isinstance(getattr(learner, "log_scale", None), torch.Tensor):
        augmented.log_scale.data.copy_(learner.log_scale.detach())
    if isinstance(learner, MemoryAugmented):
        augmented.memory = learner.memory
        augmented.memory.resize(config.capacity)
    return augmented
