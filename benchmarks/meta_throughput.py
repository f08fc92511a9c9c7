"""Meta-training throughput: metanlp's functional MAML vs a reference of learn2learn's method.

The reference does what learn2learn's MAML wrapper does, written here from its description (learn2learn
itself does not build on Python 3.11): clone the whole module per task (parameters become differentiable
copies), take inner steps by writing `p - lr * grad` back into the clone, run the whole model at every
inner step, and loop over tasks, calling backward per task. metanlp keeps a dict of fast tensors for
`torch.func.functional_call`, runs the layers the inner loop does not adapt once for all tasks of the
meta-batch, and re-runs only the adapted top layers at each inner step, on the real tokens only (padding-free
layers, learners/packed.py). Its rows show where the time goes:
- `metanlp-padded`: transformers' own layers, padding included, task by task;
- `metanlp-loop`: padding-free layers, task by task (the default on CPU: one task's graph alive at a time);
- `metanlp-stacked`: padding-free layers, the inner loops of all tasks at once on task-stacked fast weights,
  a few large batched products per step instead of one set per task (the default on CUDA, where the number of
  kernel launches bounds the time);
- `metanlp-checkpointed`: the device's default with gradient checkpointing (memory traded for time).

Same model (all-MiniLM-L6-v2), same episodes, same Proto-MAML head, same inner loop (top 2 layers + head,
5 steps, 5-way 5-shot 5-query, 4 tasks per meta-batch). Each variant runs in its own process so that its
peak memory (peak RSS on CPU, peak allocated on CUDA) is its own.

    python benchmarks/meta_throughput.py                 # writes benchmarks/results/meta_throughput.{json,md}
    python benchmarks/meta_throughput.py --meta-batches 20 --out benchmarks/results/gpu   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WAYS, SHOTS, QUERIES, TASKS, INNER_STEPS, TOP_LAYERS = 5, 5, 5, 4, 5, 2
# metanlp's variants: which layers run and how the tasks of a meta-batch go through the inner loop.
VARIANTS = {
    "metanlp-padded": {"packed": False, "batch_tasks": "never"},  # transformers' layers, padding, task by task
    "metanlp-loop": {"packed": True, "batch_tasks": "never"},  # padding-free layers, task by task (CPU default)
    "metanlp-stacked": {"packed": True, "batch_tasks": "always"},  # all tasks at once (CUDA default)
    "metanlp-checkpointed": {"packed": True, "batch_tasks": "auto", "gradient_checkpointing": True},
}
IMPLEMENTATIONS = ("reference", *VARIANTS)


def _peak_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set size


def _peak_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def clone_module(module):
    """A copy of `module` whose parameters are differentiable clones of the original's (learn2learn's way)."""
    clone = module.__new__(type(module))
    clone.__dict__ = module.__dict__.copy()
    clone._parameters = {k: None if p is None else p.clone() for k, p in module._parameters.items()}
    clone._buffers = {k: None if b is None else b.clone() for k, b in module._buffers.items()}
    clone._modules = {k: None if m is None else clone_module(m) for k, m in module._modules.items()}
    return clone


def set_parameter(module, name: str, value) -> None:
    *path, leaf = name.split(".")
    for part in path:
        module = module._modules[part]
    module._parameters[leaf] = value


def reference_step(learner, tokens, episodes, optimizer, first_order: bool) -> None:
    import torch
    import torch.nn.functional as F

    from metanlp.learners.protonet import prototypes

    optimizer.zero_grad(set_to_none=True)
    device = learner.encoder.device
    for episode in episodes:
        clone = clone_module(learner.encoder)
        params = dict(_named_tensors(clone))
        adapted = list(learner.adapted)
        support, query = tokens.batch(episode.support), tokens.batch(episode.query)
        targets = torch.as_tensor(episode.support_labels, device=device)
        h = F.normalize(clone(support), dim=-1)
        weight = learner.log_scale.exp() * F.normalize(prototypes(h, targets, WAYS), dim=-1)
        bias = torch.zeros(WAYS, device=device, requires_grad=True)
        for step in range(INNER_STEPS):
            if step > 0:
                h = F.normalize(clone(support), dim=-1)
            loss = F.cross_entropy(h @ weight.T + bias, targets)
            tensors = [params[n] for n in adapted] + [weight, bias]
            grads = torch.autograd.grad(loss, tensors, create_graph=not first_order, retain_graph=True)
            for n, g in zip(adapted, grads[:-2], strict=True):
                params[n] = params[n] - learner.config.inner_lr * g
                set_parameter(clone, n, params[n])
            weight = weight - learner.config.head_inner_lr * grads[-2]
            bias = bias - learner.config.head_inner_lr * grads[-1]
        logits = F.normalize(clone(query), dim=-1) @ weight.T + bias
        query_targets = torch.as_tensor(episode.query_labels, device=device)
        (F.cross_entropy(logits, query_targets) / len(episodes)).backward()
    optimizer.step()


def _named_tensors(module, prefix: str = ""):
    for name, p in module._parameters.items():
        if p is not None:
            yield prefix + name, p
    for name, m in module._modules.items():
        if m is not None:
            yield from _named_tensors(m, prefix + name + ".")


def count_operations(step) -> dict:
    """How many aten operations one `step()` dispatches, forward and backward, and how many of them are not
    views (on a GPU each of those is at least one kernel launch). With small tasks a GPU waits on the host, not
    on arithmetic, so between variants that spend the same host time per operation these counts, not FLOPs,
    predict the GPU's ratios (host work outside aten, such as `functional_call` re-binding a module, is unseen)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.operations = self.kernels = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.operations += 1
            self.kernels += not func.is_view
            return func(*args, **(kwargs or {}))

    with Count() as count:
        step()
    return {"operations": count.operations, "kernels": count.kernels}


MATRIX_PRODUCTS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})


def matrix_product_share(step) -> dict:
    """The share of one `step()`'s CPU time spent in matrix products (torch.profiler, self time of each aten
    operation). Near 1, time follows arithmetic; the rest is element-wise work, copies and the host's own."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return {"matrix_product_share": sum(e.self_cpu_time_total for e in events if e.key in MATRIX_PRODUCTS) / total}


def metanlp_step(learner, tokens, episodes, optimizer, first_order: bool) -> None:
    optimizer.zero_grad(set_to_none=True)
    learner.backward_batch(tokens, episodes)
    optimizer.step()


def worker(implementation: str, algorithm: str, meta_batches: int, encoder_path: str | None) -> dict:
    import torch
    from safetensors.torch import save_file

    from metanlp.config import EncoderConfig, learner_config
    from metanlp.data.episodes import EpisodeSampler
    from metanlp.data.load import load_labelled
    from metanlp.learners import build_learner

    torch.manual_seed(0)
    first_order = algorithm == "fomaml"
    config = learner_config(algorithm, inner_steps=INNER_STEPS, top_layers=TOP_LAYERS,
                            **VARIANTS.get(implementation, {}))
    encoder = EncoderConfig(attn_implementation="sdpa" if first_order else "eager",
                            **({"name_or_path": encoder_path} if encoder_path else {}))
    learner = build_learner(config, encoder)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    learner.to(device).eval()  # no dropout: both variants compute the same function
    data = load_labelled("default")
    tokens = learner.encoder.tokenize(data.texts)
    sampler = EpisodeSampler(data, WAYS, SHOTS, QUERIES, seed=0)
    batches = [sampler.take(TASKS) for _ in range(meta_batches + 1)]
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)  # lr 0: every batch sees the same weights
    step = reference_step if implementation == "reference" else metanlp_step
    step(learner, tokens, batches[0], optimizer, first_order)  # warm-up (allocator, kernels)
    grads = {n: p.grad.detach().clone() for n, p in learner.named_parameters() if p.grad is not None}
    _peak_reset()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches[1:]:
        step(learner, tokens, batch, optimizer, first_order)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = _peak_mib()
    # Counted and profiled on the CPU only: there the backward runs on this thread, so both see it too.
    def one_step() -> None:
        step(learner, tokens, batches[1], optimizer, first_order)

    counts = {} if device.type == "cuda" else count_operations(one_step) | matrix_product_share(one_step)
    save_file({n: g.contiguous().cpu() for n, g in grads.items()}, os.environ["METANLP_GRADS"])
    return {"implementation": implementation, "algorithm": algorithm, "episodes_per_s": meta_batches * TASKS / seconds,
            "seconds_per_meta_batch": seconds / meta_batches, "peak_mib": peak, "device": str(device), **counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meta-batches", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--encoder", help="encoder name or path (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--worker", nargs=2, metavar=("IMPLEMENTATION", "ALGORITHM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.meta_batches, args.encoder)))
        return
    import torch
    from safetensors.torch import load_file

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for algorithm in ("fomaml", "maml"):
        grads = {}
        for implementation in IMPLEMENTATIONS:
            grad_file = args.out / f".grads_{implementation}_{algorithm}.safetensors"
            env = {**os.environ, "METANLP_GRADS": str(grad_file), "HF_HUB_OFFLINE": "1"}
            command = [sys.executable, __file__, "--worker", implementation, algorithm,
                       "--meta-batches", str(args.meta_batches), *(["--encoder", args.encoder] if args.encoder else [])]
            result = subprocess.run(command, check=True, capture_output=True, text=True, env=env, cwd=ROOT)
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            grads[implementation] = load_file(grad_file)
            grad_file.unlink()
            print(rows[-1], flush=True)
        # Same computation, so the same meta-gradient: the speed-up is not bought with a different algorithm.
        # (Relative L2 over all tensors: some, like attention key biases, have exactly-zero true gradients.)
        for row, implementation in zip(rows[-len(IMPLEMENTATIONS) + 1:], IMPLEMENTATIONS[1:], strict=True):
            theirs = grads[implementation]
            diff = sum(float((grads["reference"][n] - g).pow(2).sum()) for n, g in theirs.items())
            row["rel_l2_grad_diff_vs_reference"] = (diff / sum(float(g.pow(2).sum()) for g in theirs.values())) ** 0.5
    counted = all("kernels" in r for r in rows)
    table = ["| algorithm | implementation | episodes/s | s per meta-batch | peak MiB | speed-up | memory ratio | "
             "meta-gradient vs reference (rel. L2) |" + (" kernels per meta-batch | kernel-count ratio | "
                                                         "matrix products, share of CPU time |" if counted else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|---|" if counted else "")]
    for algorithm in ("fomaml", "maml"):
        ref = next(r for r in rows if r["algorithm"] == algorithm and r["implementation"] == "reference")
        for r in (r for r in rows if r["algorithm"] == algorithm):
            speedup, memory = r["episodes_per_s"] / ref["episodes_per_s"], r["peak_mib"] / ref["peak_mib"]
            grad_diff = r.get("rel_l2_grad_diff_vs_reference")
            table.append(f"| {algorithm} | {r['implementation']} | {r['episodes_per_s']:.2f} | "
                         f"{r['seconds_per_meta_batch']:.2f} | {r['peak_mib']:.0f} | {speedup:.2f}x | {memory:.2f} | "
                         + ("— |" if grad_diff is None else f"{grad_diff:.1e} |")
                         + (f" {r['kernels']} | {ref['kernels'] / r['kernels']:.2f}x | "
                            f"{100 * r['matrix_product_share']:.0f}% |" if counted else ""))
    header = (f"Meta-training throughput, `python benchmarks/meta_throughput.py --meta-batches {args.meta_batches}`; "
              f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'} "
              f"({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}). "
              f"MiniLM-L6, inner loop on the top {TOP_LAYERS} layers + head, {INNER_STEPS} steps, "
              f"{WAYS}-way {SHOTS}-shot {QUERIES}-query, "
              f"{TASKS} tasks per meta-batch; peak memory is "
              + ("peak allocated GPU memory (model included)" if torch.cuda.is_available() else
                 "peak RSS on CPU (whole process, model included)") + ".\n\n")
    (args.out / "meta_throughput.md").write_text(header + "\n".join(table) + "\n")
    (args.out / "meta_throughput.json").write_text(json.dumps(rows, indent=2))
    print(header + "\n".join(table))


if __name__ == "__main__":
    main()
