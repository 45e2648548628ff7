"""Where a tiny ICF training step spends its time: self CPU time per op, forward vs backward, by module.

    python bench/profile_step.py [--threads 1] [--batch 4] [--steps 2] [--top 25]

The model and batch are `bench/train_speed.py`'s (tiny preset, AVSS, tiny CLIP/CLAP towers). One warm-up step,
then ``--steps`` steps of the tree's own `icf.train.trainer.train_step` under ``torch.profiler``. Every op is
charged to a group: forward ops to the innermost labelled module whose ``forward`` they ran in (backbone, pixel
decoder, audio CNN, channel context, query decoder, mask head, text hook, MIT, SC; "forward other" for the rest
of the model's forward), to the loss call, or to the optimiser; backward ops to the group whose forward created
their autograd node (the nodes behind each labelled module's outputs, by sequence number); ops outside all of
these (gradient clipping, zero_grad) to "outside". Prints ms of self CPU per step per group (forward, backward)
and the top ops. Another commit's code: ``PYTHONPATH=<git archive of it> python bench/profile_step.py``.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

from icf.config import preset
from icf.data.datasets import load_info
from icf.encoders import EncoderSpec, load, text_bank
from icf.model import ICF
from icf.model.bidir import BidirSegmenter
from icf.train.trainer import make_optimizer, train_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import make_batch  # noqa: E402

GROUPS = {  # module path prefix in ICF → group name
    "segmenter.backbone": "backbone", "segmenter.pixel_decoder": "pixel decoder", "segmenter.audio": "audio CNN",
    "segmenter.context": "channel context (Eq. 1-2)", "segmenter.decoder": "query decoder (fusion)",
    "segmenter.mask_head": "mask head", "segmenter.text_attn": "text hook", "mit": "MIT", "sc": "SC",
}
LABEL = "grp::"
OPTIMIZER = "Optimizer."  # torch's own ranges around optimizer.step / zero_grad
PENDING = "forward other"  # the model's forward outside every labelled module


class NodeGroups:
    """Autograd node sequence number → group: after each labelled forward, the new nodes behind its outputs."""

    def __init__(self) -> None:
        self.seq: dict[int, str] = {}

    def mark(self, value, group: str) -> None:
        stack = [t.grad_fn for t in _tensors(value) if t.grad_fn is not None]
        while stack:
            node = stack.pop()
            nr = node._sequence_nr()
            if nr in self.seq and node.name() != "torch::autograd::AccumulateGrad":
                continue
            self.seq.setdefault(nr, group)
            stack += [n for n, _ in node.next_functions if n is not None and n._sequence_nr() not in self.seq]


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    elif hasattr(value, "__dataclass_fields__"):
        value = [getattr(value, f) for f in value.__dataclass_fields__]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def label_modules(model: torch.nn.Module, nodes: NodeGroups) -> None:
    """Wrap each grouped module's forward in a ``record_function`` range named after its group, and charge the
    autograd nodes it creates to that group (its inputs' nodes are marked first, so they stay with their makers)."""
    for path, module in model.named_modules():
        if path in GROUPS or path == "":
            name = GROUPS.get(path, PENDING)
            forward = module.forward

            def wrapped(*args, _f=forward, _n=name, **kwargs):
                nodes.mark([args, kwargs], PENDING)
                with torch.profiler.record_function(LABEL + _n):
                    out = _f(*args, **kwargs)
                nodes.mark(out, _n)
                return out

            module.forward = wrapped


def build(batch_size: int):
    """`bench/train_speed.py`'s model (seed 0), optimiser and batch."""
    torch.manual_seed(0)
    cfg, train_cfg = preset("tiny", "avss")
    enc = load(EncoderSpec.tiny())
    model = ICF(BidirSegmenter(cfg), enc, text_bank(enc, list(load_info("avss").classes)[:8]))
    optimizer = make_optimizer(model, train_cfg)
    dims = {"clip": enc.clip.encode_text(["a"]).shape[-1], "clap": enc.clap.encode_text(["a"]).shape[-1]}
    return model, optimizer, train_cfg, make_batch(cfg, dims, batch_size)


def step(model, optimizer, scheduler, train_cfg, batch, nodes: NodeGroups) -> None:
    """One `icf.train.trainer.train_step` (the tree's own step: clipping, optimiser and whatever else it does), with
    the loss call labelled."""

    def loss_of(out, batch):
        nodes.mark(out, PENDING)
        with torch.profiler.record_function(LABEL + "loss"):
            losses = model.loss(out, batch)
        nodes.mark(losses, "loss")
        return losses

    train_step(model, loss_of, batch, optimizer, scheduler, train_cfg, torch.device("cpu"))


def group_of(event, memo: dict) -> str | None:
    """The innermost ``grp::`` range holding a CPU event (None outside every range)."""
    chain, node = [], event
    while node is not None and id(node) not in memo:
        if node.name.startswith(LABEL) or node.name.startswith(OPTIMIZER):
            memo[id(node)] = node.name[len(LABEL):] if node.name.startswith(LABEL) else "optimizer"
            break
        chain.append(node)
        node = node.cpu_parent
    found = memo.get(id(node)) if node is not None else None
    for n in chain:
        memo[id(n)] = found
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, optimizer, train_cfg, batch = build(args.batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    nodes = NodeGroups()
    label_modules(model, nodes)
    torch.manual_seed(1)
    if hasattr(model, "loss_calls"):
        model.loss_calls.fill_(1)  # past the first call: no gradient-share passes (logged every 25th step only)
    step(model, optimizer, scheduler, train_cfg, batch, nodes)  # warm-up
    table: dict[tuple[str, str], float] = collections.defaultdict(float)
    ops: dict[tuple[str, str, str], float] = collections.defaultdict(float)
    for _ in range(args.steps):
        nodes.seq.clear()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step(model, optimizer, scheduler, train_cfg, batch, nodes)
        memo: dict = {}
        for ev in prof.profiler.function_events:
            if ev.name.startswith(LABEL):
                continue
            g, phase = group_of(ev, memo), "fwd"
            if g is None:  # backward pass: the group of the autograd node being evaluated
                node = ev
                while node is not None and not node.name.startswith("autograd::engine::evaluate_function"):
                    node = node.cpu_parent
                if node is None:
                    g, phase = "outside (clipping, zero_grad)", "-"
                else:
                    g, phase = ("accumulate grad", "-") if "AccumulateGrad" in node.name else (nodes.seq.get(node.sequence_nr, "unmatched"), "bwd")
            elif g == "optimizer":
                phase = "-"
            table[(g, phase)] += ev.self_cpu_time_total / 1e3 / args.steps
            ops[(g, phase, ev.name)] += ev.self_cpu_time_total / 1e3 / args.steps
    total = sum(table.values())
    print(f"tiny ICF step, AVSS batch {args.batch}, {args.threads} thread(s): {total:.0f} ms self CPU per step")
    names = sorted({g for g, _ in table}, key=lambda g: -sum(v for (h, _), v in table.items() if h == g))
    print(f"{'group':32s} {'fwd ms':>9s} {'bwd ms':>9s} {'other':>9s} {'share':>6s}")
    for g in names:
        f, b, o = (table.get((g, p), 0.0) for p in ("fwd", "bwd", "-"))
        print(f"{g:32s} {f:9.1f} {b:9.1f} {o:9.1f} {100 * (f + b + o) / total:5.1f}%")
    print(f"\ntop {args.top} ops (group, phase, op: ms per step)")
    for (g, p, name), ms in sorted(ops.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{ms:9.1f}  {g:28s} {p:4s} {name}")


if __name__ == "__main__":
    main()
