"""The same masked training step in npmask and in PyTorch, taking turns in one process.

Run (torch is a benchmark-only extra: ``pip install -e '.[bench]'``):
    .venv/bin/python benchmarks/vs_torch.py                       # CPU, the three networks below
    .venv/bin/python benchmarks/vs_torch.py --device cuda         # npmask on CuPy, PyTorch on CUDA
    .venv/bin/python benchmarks/vs_torch.py --nets wrn16_1:32:32 --variants full --rounds 3

For each network (``name:image size:batch``; default WRN-28-4 64x64 batch 32, WRN-16-1 and WRN-28-1
32x32 batch 32) and variant (``full``, ``piggyback``, ``finetune``: every weight trained, no mask)
it prints:

- the training step's median time in npmask and in PyTorch, and npmask / PyTorch: the median over
  the rounds of the two times' ratio within a round (the two take turns, in alternating order, so a
  change of machine load affects both alike);
- each step against the GEMM floor: the step's GEMM FLOPs (``train_step.step_flops``) at the
  float32 GEMM rate measured in the same run;
- inference (eval-mode forward of the masked network) at batch 1 and 64, the same way;
- with ``--cuda-graphs`` (CUDA only), a row ``train+graphs`` per variant: npmask's step replayed from
  CUDA graphs (``npmask.training.graph_step.GraphStep``), timed in the same rounds as the plain
  npmask step and PyTorch's, so the table shows the ratio before and after that lever.

The PyTorch side is written here from the method's definitions (docs/design.md, section 1), in a
few lines of autograd: W~ = k0 W + k1 + k2 M + k3 W∘M with M = 1[R >= 0] in the forward pass and the
straight-through gradient for R. Both sides start from the same backbone weights (copied from npmask's
state_dict, with PyTorch's strict loading, which checks that the two networks have the same layout),
the same R, and the same batch; the step is forward, softmax cross-entropy, backward, Adam (lr 1e-4)
for masks, k's and batch norm, SGD with momentum 0.9 (lr 1e-3) for the classifier. ``piggyback``
keeps the backbone's batch norm frozen in eval mode, as npmask does.

The first round's logits of the two are compared, so a difference in the networks would show.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed
import numpy as np  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    sys.exit("benchmarks/vs_torch.py needs PyTorch: pip install -e '.[bench]' (or pip install torch)")

from npmask import models  # noqa: E402
from npmask.backend import get_backend, to_numpy  # noqa: E402
from npmask.multidomain import MultiDomainModel  # noqa: E402
from npmask.optim import SGD, Adam, Optimizers  # noqa: E402
from npmask.training.graph_step import GraphStep  # noqa: E402
from npmask.training.loop import train_step  # noqa: E402

from _timing import Clock, gemm_rate  # noqa: E402  (benchmarks/_timing.py, beside this script)
from train_step import step_flops  # noqa: E402

DEFAULT_NETS = "wrn28_4:64:32,wrn16_1:32:32,wrn28_1:32:32"
NUM_CLASSES = 10


# ---------------------------------------------------------------------------------- PyTorch side
class TorchMaskedConv(torch.nn.Module):
    """A frozen conv weight W, a real mask R and k's: W~ = k0 W + k1 + k2 M + k3 W∘M, M = 1[R >= 0].

    ``full``: k0 fixed at 1 (batch norm follows every conv of a WRN), k1 = k2 = k3 = 0 learned.
    ``piggyback``: W~ = W∘M. R's gradient is the straight-through one: dL/dR = dL/dM.
    """

    def __init__(self, weight: torch.Tensor, R: torch.Tensor, stride: int, padding: int, variant: str):
        super().__init__()
        self.register_buffer("weight", weight)
        self.R = torch.nn.Parameter(R)
        self.stride, self.padding, self.variant = stride, padding, variant
        if variant == "full":
            self.k = torch.nn.Parameter(torch.zeros(3, dtype=weight.dtype, device=weight.device))

    def forward(self, x):
        hard = (self.R >= 0).to(self.R.dtype)
        M = hard + self.R - self.R.detach()          # forward: the hard mask; backward: identity
        if self.variant == "piggyback":
            w = self.weight * M
        else:
            k1, k2, k3 = self.k
            w = self.weight + k1 + k2 * M + k3 * self.weight * M
        return F.conv2d(x, w, stride=self.stride, padding=self.padding)


class TorchBlock(torch.nn.Module):
    """The post-activation WRN basic block of npmask.nn.residual, with the same child names."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                torch.nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class TorchWRN(torch.nn.Module):
    """npmask.models.WRN in PyTorch, with the same parameter names."""

    def __init__(self, depth, width, num_classes):
        super().__init__()
        n = (depth - 4) // 6
        self.conv1 = torch.nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(16)
        cin = 16
        for i, planes in enumerate((16 * width, 32 * width, 64 * width), start=1):
            blocks = []
            for b in range(n):
                blocks.append(TorchBlock(cin, planes, 2 if b == 0 else 1))
                cin = planes
            setattr(self, f"layer{i}", torch.nn.Sequential(*blocks))
        self.fc = torch.nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def torch_masked_net(backbone, masked_net, depth, width, variant, device):
    """A PyTorch WRN with the npmask backbone's weights and batch norm, the masked network's R and
    head, every conv masked."""
    net = TorchWRN(depth, width, NUM_CLASSES)

    def tensor(v):
        return torch.from_numpy(np.ascontiguousarray(to_numpy(v)))
    state = {k: tensor(v) for k, v in backbone.state_dict().items()}
    state.update({k: tensor(v) for k, v in masked_net.state_dict().items() if k in state})  # domain BN
    # (finetune: the domain's copy of every weight, equal to the backbone's at the start)
    head = dict(masked_net.named_modules())["fc"]
    state.update({f"fc.{k}": tensor(v) for k, v in head.params.items()})
    net.load_state_dict(state, strict=True)
    masked = dict(masked_net.named_modules())
    for name, m in list(net.named_modules()):
        if isinstance(m, torch.nn.Conv2d) and variant != "finetune":  # finetune: plain convs
            R = tensor(masked[name].params["mask_real"])
            parent, _, child = name.rpartition(".")
            holder = net.get_submodule(parent) if parent else net
            setattr(holder, child, TorchMaskedConv(m.weight.detach().clone(), R.clone(), m.stride[0],
                                                   m.padding[0], variant))
    net = net.to(device)
    body = [p for n, p in net.named_parameters() if not n.startswith("fc.")]
    if variant == "piggyback":                         # the backbone's BN, frozen
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.requires_grad_(False)
                m.bias.requires_grad_(False)
        body = [p for p in body if p.requires_grad]
    return net, torch.optim.Adam(body, lr=1e-4), torch.optim.SGD(net.fc.parameters(), lr=1e-3, momentum=0.9)


def torch_train_mode(net, variant):
    net.train()
    if variant == "piggyback":
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()


def torch_step(net, adam, sgd, x, y):
    adam.zero_grad(set_to_none=False)
    sgd.zero_grad(set_to_none=False)
    logits = net(x)
    F.cross_entropy(logits, y).backward()
    adam.step()
    sgd.step()
    return logits


# ---------------------------------------------------------------------------------- timing
class TorchClock:
    """Wall time on the CPU; CUDA events on the GPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def time(self, fn) -> float:
        if self.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def take_turns(fns, clocks, rounds):
    """Times of each fn per round, the order reversed every other round, after one warm-up call each."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for r in range(rounds):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            times[i].append(clocks[i].time(fns[i]))
    return [np.array(t) for t in times]


def compare_net(name, size, batch, variants, args, xp, backend, device, clock_np, clock_t):
    depth, width = (int(v) for v in name[3:].split("_"))
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    y_np = rng.integers(0, NUM_CLASSES, batch)
    backbone = models.create(name, num_classes=NUM_CLASSES, input_size=size, seed=0)
    flops, fwd_flops = step_flops(backbone, x_np)
    rows = []
    for variant in variants:
        model = MultiDomainModel(backbone)
        model.add_domain(variant, num_classes=NUM_CLASSES, variant=variant, seed=0)
        model.set_domain(variant).train()
        tnet, adam, sgd = torch_masked_net(backbone, model.network(), depth, width, variant, device)
        model.to(backend)
        groups = model.parameter_groups()
        opt = Optimizers(body=Adam(groups["body"], lr=1e-4), head=SGD(groups["head"], lr=1e-3, momentum=0.9))
        x, y = xp.asarray(x_np), xp.asarray(y_np)
        xt, yt = torch.from_numpy(x_np).to(device), torch.from_numpy(y_np).to(device)
        torch_train_mode(tnet, variant)

        first_np = to_numpy(model.forward(x))
        with torch.no_grad():
            first_t = tnet(xt).cpu().numpy()
        diff = float(np.max(np.abs(first_np - first_t)))

        fns = [lambda: train_step(model, opt, x, y), lambda: torch_step(tnet, adam, sgd, xt, yt)]
        if args.cuda_graphs:
            graphed = MultiDomainModel(backbone)      # its own copy of the variant, same seed
            graphed.add_domain(variant, num_classes=NUM_CLASSES, variant=variant, seed=0)
            graphed.set_domain(variant).train()
            graphed.to(backend)
            g = graphed.parameter_groups()
            step = GraphStep(graphed, Optimizers(body=Adam(g["body"], lr=1e-4),
                                                 head=SGD(g["head"], lr=1e-3, momentum=0.9)))
            step(x, y)                                # uncaptured; take_turns' warm-up captures
            fns.append(lambda: step(x, y))
        times = take_turns(fns, [clock_np, clock_t, clock_np][:len(fns)], args.rounds)
        t_np, t_t = times[0], times[1]
        ratio = float(np.median(t_np / t_t))
        rows.append(("train", variant, batch, np.median(t_np), np.median(t_t), ratio, flops, diff))
        if args.cuda_graphs:
            rows.append(("train+graphs", variant, batch, np.median(times[2]), np.median(t_t),
                         float(np.median(times[2] / t_t)), flops, None))

        if variant == "full" and not args.no_inference:
            model.eval()
            tnet.eval()
            for b in (1, 64):
                xb = xp.asarray(np.resize(x_np, (b, 3, size, size)))
                xbt = torch.from_numpy(np.resize(x_np, (b, 3, size, size))).to(device)

                def infer_t(xbt=xbt):
                    with torch.no_grad():
                        tnet(xbt)
                t_np, t_t = take_turns([lambda xb=xb: model.forward(xb), infer_t], [clock_np, clock_t],
                                       args.rounds)
                rows.append(("eval", variant, b, np.median(t_np), np.median(t_t), float(np.median(t_np / t_t)),
                             fwd_flops * b / batch, None))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--nets", default=DEFAULT_NETS, help=f"name:size:batch,... (default {DEFAULT_NETS})")
    ap.add_argument("--variants", default="full,piggyback")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads (default: PyTorch's own choice, one per core)")
    ap.add_argument("--no-inference", action="store_true", help="skip the eval-forward timings")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="cuda: also time npmask's step replayed from CUDA graphs (rows train+graphs)")
    ap.add_argument("--tf32", action="store_true",
                    help="cuda: let both sides multiply float32 in TF32 (PyTorch's cuDNN and matmul "
                         "flags, CuPy's CUPY_TF32=1); default: IEEE float32 on both")
    args = ap.parse_args(argv)
    if args.cuda_graphs and args.device != "cuda":
        ap.error("--cuda-graphs needs --device cuda")
    if args.tf32 and args.device != "cuda":
        ap.error("--tf32 needs --device cuda")
    # PyTorch's cuDNN convolutions take TF32 unless told not to, npmask's GEMMs only under CUPY_TF32
    # (read by CuPy at its first float32 matmul): one setting for both, or the ratio compares
    # different arithmetic.
    if args.device == "cuda":
        import os  # noqa: PLC0415
        os.environ["CUPY_TF32"] = "1" if args.tf32 else "0"
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cuda.matmul.allow_tf32 = args.tf32

    backend = "cupy" if args.device == "cuda" else "numpy"
    xp = get_backend(backend)
    device = torch.device(args.device)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    clock_np, clock_t = Clock(xp), TorchClock(device)
    rate_before = gemm_rate(xp, clock_np)
    arithmetic = "" if args.device == "cpu" else f"; float32 as {'TF32' if args.tf32 else 'IEEE'} on both sides"
    print(f"device {args.device}; torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"numpy {np.__version__}; float32 GEMM {rate_before:.0f} GFLOP/s{arithmetic}")

    rows = []
    for spec in args.nets.split(","):
        name, size, batch = spec.split(":")
        for row in compare_net(name, int(size), int(batch), args.variants.split(","), args, xp, backend,
                               device, clock_np, clock_t):
            rows.append((name, int(size)) + row)
    rate_after = gemm_rate(xp, clock_np)
    rate = (rate_before + rate_after) / 2
    print(f"GEMM rate at the end {rate_after:.0f} GFLOP/s; floors use {rate:.0f}")
    print()
    print("| network | size | pass | variant | batch | npmask s | torch s | npmask/torch | npmask/floor "
          "| torch/floor | logits max diff |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, size, kind, variant, batch, tn, tt, ratio, flops, diff in rows:
        floor = flops / 1e9 / rate
        d = "" if diff is None else f"{diff:.1e}"
        print(f"| {name} | {size} | {kind} | {variant} | {batch} | {tn:.4f} | {tt:.4f} | {ratio:.2f} "
              f"| {tn / floor:.2f} | {tt / floor:.2f} | {d} |")


if __name__ == "__main__":
    main()
