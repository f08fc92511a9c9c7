"""The inner-step rule of the gradient meta-learners: which tensors adapt, how far each step moves them
(fixed rates, or Meta-SGD's learned ones), and whether the meta-gradient goes through the steps (order).

`adapt_fast_weights` is the inner loop itself. It never copies modules: it keeps a dict of "fast" tensors
that the caller's feature function runs the encoder with. How a meta-batch of such loops is executed (task
by task, vmapped, task-stacked) is `meta_batch`'s business; which encoder layers run where is `encoder_split`'s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from metanlp.config import GradientConfig
from metanlp.encoder import TextEncoder

HEAD = ("head.weight", "head.bias")


def add_lora_adapters(encoder: TextEncoder, config: GradientConfig) -> None:
    """LoRA adapters (peft) in the top N layers; they start as a no-op (B = 0) and are meta-learned.

    peft freezes the base weights: the outer loop then learns the adapters' start, the head scale and
    (Meta-SGD) the inner learning rates, which keeps meta-training memory small on large encoders."""
    from peft import LoraConfig, inject_adapter_in_model

    layers = len(encoder.model.encoder.layer)
    lora = LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.0,
                      target_modules=list(config.lora_targets),
                      layers_to_transform=list(range(max(0, layers - config.top_layers), layers)))
    inject_adapter_in_model(lora, encoder.model)


def adapted_parameter_names(encoder: TextEncoder, adapt: str, top_layers: int) -> list[str]:
    """Encoder tensors the inner loop changes: none (head only), those of the top N layers, LoRA adapters,
    or all."""
    names = [n for n, p in encoder.named_parameters() if p.requires_grad]
    if adapt == "head":
        return []
    if adapt == "lora":
        return [n for n in names if ".lora_" in n]
    if adapt == "all":
        return [n for n in names if ".pooler." not in n]  # the pooler is unused: we pool ourselves
    layer_of = {n: int(m.group(1)) for n in names if (m := re.search(r"\.layer\.(\d+)\.", n))}
    if not layer_of:
        raise ValueError("adapt='top' needs an encoder whose parameters are named '...layer.<i>...'")
    first = max(layer_of.values()) + 1 - top_layers
    return [n for n in names if layer_of.get(n, -1) >= first]


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys may not contain dots


def learned_rates(config: GradientConfig, adapted: list[str]) -> nn.ParameterDict:
    """Meta-SGD's log learning rates, one per adapted tensor and head tensor (empty without learned rates);
    the learner registers them, so they are meta-trained and saved with its weights."""
    rates = nn.ParameterDict()
    if config.learn_inner_lr:
        for name in adapted:
            rates[_key(name)] = nn.Parameter(torch.tensor(math.log(config.inner_lr)))
        for name in HEAD:
            rates[_key(name)] = nn.Parameter(torch.tensor(math.log(config.head_inner_lr)))
    return rates


class InnerRule:
    """Which encoder tensors adapt, and the step size of each (head tensors included)."""

    def __init__(self, config: GradientConfig, adapted: list[str], log_rates: nn.ParameterDict) -> None:
        self.config, self.adapted, self.log_rates = config, adapted, log_rates

    def rate(self, name: str) -> torch.Tensor | float:
        if self.config.learn_inner_lr:
            return self.log_rates[_key(name)].exp()
        return self.config.head_inner_lr if name in HEAD else self.config.inner_lr


def support_loss(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The head's cross-entropy; on a stack of tasks the sum of each task's mean, so that every task's fast
    tensors get the gradient they would get alone."""
    logits = h @ weight.mT + bias.unsqueeze(-2)
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="sum") / targets.shape[-1]


HeadInit = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
Features = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def adapt_fast_weights(rule: InnerRule, start: dict[str, torch.Tensor], features: Features, targets: torch.Tensor,
                       n_classes: int, head_init: HeadInit, *, steps: int, create_graph: bool, track_meta: bool,
                       tasks: int | None = None) -> dict[str, torch.Tensor]:
    """Adapt on the support set; returns the fast tensors (adapted encoder tensors and the head).

    start: the adapted encoder tensors' meta-parameters. features: fast tensors -> support features.
    track_meta: keep the graph back to the meta-parameters (meta-training); otherwise the start is detached.
    create_graph: differentiate through the inner gradients (second order).
    tasks: a stack of that many tasks adapts at once ([tasks, support] targets, features on a TaskGrid);
    every fast tensor starts as the meta-parameter repeated per task, so each task gets its own gradient.
    """
    fast = {n: p if track_meta else p.detach().requires_grad_() for n, p in start.items()}
    if tasks is not None:
        fast = {n: p.expand(tasks, *p.shape) for n, p in fast.items()}
    h = features(fast)
    targets = targets.to(h.device)
    weight, bias = head_init(h, targets, n_classes)
    if not track_meta:
        weight, bias, h = weight.detach().requires_grad_(), bias.detach().requires_grad_(), h.detach()
    fast.update({HEAD[0]: weight, HEAD[1]: bias})
    first_order_meta = track_meta and not create_graph
    for step in range(steps):
        probe = fast
        if first_order_meta and step > 0:
            # First order needs only the value of later inner gradients: take them on graph-free copies,
            # so no step after the first keeps its activations alive until the outer backward.
            probe = {n: t.detach().requires_grad_() for n, t in fast.items()}
            h = h.detach()
        if step > 0 and rule.adapted:
            h = features({n: probe[n] for n in rule.adapted})
        loss = support_loss(h, probe[HEAD[0]], probe[HEAD[1]], targets)
        names = list(probe)
        # retain_graph: the outer loss still needs the graph from the meta-parameters to the start.
        grads = torch.autograd.grad(loss, [probe[n] for n in names], create_graph=create_graph,
                                    retain_graph=track_meta and probe is fast, allow_unused=True)
        fast = {n: fast[n] if g is None else fast[n] - rule.rate(n) * g for n, g in zip(names, grads, strict=True)}
        if not track_meta:  # adaptation at test time: plain SGD on leaf tensors
            fast = {n: t.detach().requires_grad_() for n, t in fast.items()}
    return fast
