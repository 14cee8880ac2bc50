"""npmask <-> PyTorch: torchvision weights in through ``python -m npmask.convert``, a domain out
through ``python -m npmask.export``, logits compared in float32 and float64.

    PYTHONPATH=$PWD python benchmarks/interop_torch.py [--models resnet50,densenet121,vgg16] [--out FILE.md]

Needs torch and torchvision (CPU is enough; nothing is downloaded: ``weights=None``, random
initialisation). Per model:

1. in: a torchvision model with random weights *and* random BN running statistics (so eval mode is
   a real test) -> state_dict -> .safetensors -> ``npmask.convert`` -> ``load_backbone`` (float32
   and float64) -> max |logit difference| against torchvision in eval mode, same dtype;
2. out: a ``full``-variant domain on that backbone with random masks, k's, BN and head ->
   ``save_domain`` -> ``npmask.export`` to .safetensors -> a stock torchvision model loads it
   with ``load_state_dict(strict=True)`` ->
   max |logit difference| against npmask's ``predict``, float32 and float64.

tests/test_torch_interop.py runs the same functions on small models when torch is installed.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def torch_model(name: str, num_classes: int = 1000, seed: int = 0):
    import torch
    import torchvision
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def save_safetensors(model, path) -> None:
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))


def run(*args) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout.strip()


def torch_logits(model, x: np.ndarray):
    import torch
    m = model.double() if x.dtype == np.float64 else model.float()
    with torch.no_grad():
        return m(torch.from_numpy(x)).numpy()


def weights_in(name: str, folder: Path, x: np.ndarray, num_classes: int = 1000) -> dict:
    """torchvision -> npmask; returns the commands run and max |diff| per dtype."""
    from npmask.pretrained import load_backbone
    tm = torch_model(name, num_classes)
    src, out = folder / f"{name}.safetensors", folder / f"{name}.npz"
    save_safetensors(tm, src)
    cmd = ["npmask.convert", str(src), "--model", name, "--out", str(out), "--domain", "random-init"]
    run(*cmd)
    res = {"convert": "python -m " + " ".join(cmd), "tm": tm, "backbone": out}
    for dt in (np.float32, np.float64):
        model, _ = load_backbone(out, dtype=dt)
        xs = x.astype(dt)
        ours, theirs = model.eval().forward(xs), torch_logits(tm, xs)
        res[np.dtype(dt).name] = (float(np.abs(ours - theirs).max()), float(np.abs(theirs).max()))
    res["npmask_params"] = model.num_parameters()
    res["torch_params"] = sum(p.numel() for p in tm.parameters())
    return res


def domain_out(name: str, backbone: Path, folder: Path, x: np.ndarray, num_classes: int = 7) -> dict:
    """npmask domain -> export -> torchvision; returns the command, key check and max |diff| per dtype."""
    import torch
    import torchvision
    from safetensors.torch import load_file
    from npmask.masking.layers import MaskedConv2d, MaskedLinear
    from npmask.multidomain import MultiDomainModel
    from npmask.pretrained import load_backbone
    from npmask.storage import save_domain
    res = {}
    for dt in (np.float32, np.float64):
        bb, _ = load_backbone(backbone, dtype=dt)
        md = MultiDomainModel(bb)
        net = md.add_domain("dom", num_classes, "full", seed=3)
        rng = np.random.default_rng(4)
        for m in net.modules():
            if isinstance(m, (MaskedConv2d, MaskedLinear)):
                m.params["mask_real"][...] = rng.uniform(-0.3, 1.0, m.params["mask_real"].shape)  # ~23% zeros
                # k's on the scale of the layer's weights: k1, k2 move each weight by ~5% of the
                # weights' spread (larger shifts kill every ReLU of a BN-free VGG: constant logits)
                std = float(np.std(m.weight))
                scale = {0: (0.8, 1.2), 1: (-0.05 * std, 0.05 * std), 2: (-0.05 * std, 0.05 * std), 3: (-0.2, 0.2)}
                for j in range(4):
                    if f"k{j}" in m.params:
                        m.params[f"k{j}"][...] = rng.uniform(*scale[j], m.params[f"k{j}"].shape)
            elif "running_var" in m.buffers:
                m.buffers["running_mean"][...] += rng.uniform(-0.05, 0.05, m.buffers["running_mean"].shape)
        tag = np.dtype(dt).name
        dom_file, out = folder / f"{name}-dom-{tag}.npz", folder / f"{name}-dom-{tag}.safetensors"
        save_domain(md, "dom", dom_file)
        cmd = ["npmask.export", str(dom_file), "--backbone", str(backbone), "--out", str(out)]
        if dt == np.float64:      # export reads the backbone in its stored dtype: float64 goes via the API
            from npmask.export import write_state_dict
            write_state_dict(out, md.export_dense("dom"))
        else:
            run(*cmd)
            res["export"] = "python -m " + " ".join(cmd)
        tm = getattr(torchvision.models, name)(weights=None, num_classes=num_classes).eval()
        sd = load_file(str(out))
        # strict=True: every name and shape must match. (BatchNorm's loader fills a missing
        # num_batches_tracked in with 0 -- torch 2.14 does; an older torch that reports it missing
        # needs strict=False and a check that nothing else is missing or unexpected.)
        tm.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)
        if dt == np.float64:
            tm = tm.double()
            with torch.no_grad():            # load the float64 values exactly
                for k, p in list(tm.state_dict().items()):
                    if k in sd:
                        p.copy_(sd[k])
        xs = x.astype(dt)
        ours, theirs = md.predict(xs, domain="dom"), torch_logits(tm, xs)
        res[tag] = (float(np.abs(ours - theirs).max()), float(np.abs(theirs).max()))
        # the two images must get different logits, else the comparison sees only the head's bias
        res["spread_" + tag] = float(np.abs(ours[0] - ours[1]).max())
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet50,densenet121,vgg16")
    p.add_argument("--out", default=None, help="write the table (markdown) to this file")
    args = p.parse_args(argv)
    import torch
    import torchvision
    import safetensors
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.models.split(","):
            size = 224 if name.startswith("vgg") else 64
            x = np.random.default_rng(0).standard_normal((2, 3, size, size))
            r_in = weights_in(name, folder, x)
            r_out = domain_out(name, r_in["backbone"], folder, x)
            rows.append((name, size, r_in, r_out))
            print(f"{name}: params npmask {r_in['npmask_params']:,} torchvision {r_in['torch_params']:,}; in: "
                  f"f32 {r_in['float32'][0]:.3g} (|logit| <= {r_in['float32'][1]:.3g}), f64 {r_in['float64'][0]:.3g}; "
                  f"out: f32 {r_out['float32'][0]:.3g}, f64 {r_out['float64'][0]:.3g} (|logit| <= {r_out['float32'][1]:.3g}, "
                  f"images differ by {r_out['spread_float32']:.3g})", flush=True)
    lines = [
        "# npmask <-> PyTorch interop (benchmarks/interop_torch.py)",
        "",
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, safetensors {safetensors.__version__}, "
        f"numpy {np.__version__}, Python {platform.python_version()}, {platform.machine()} CPU; "
        "random-initialised torchvision models (weights=None) with random BN running statistics, eval mode, "
        "batch 2. 'in': torchvision state_dict -> .safetensors -> `python -m npmask.convert` -> npmask logits vs "
        "torchvision logits. 'out': a `full` domain with random masks (~23% zeros), k's, BN statistics and "
        "head -> `python -m npmask.export` -> stock torchvision `load_state_dict(strict=True)` "
        "(torch fills the absent `num_batches_tracked` in) -> torchvision logits vs npmask's. Max |difference| (max |logit|); 'spread': max |logit difference| "
        "between the two images of the batch under the domain (non-zero: the features reach the head).",
        "",
        "| model | input | params npmask / torchvision | in float32 | in float64 | out float32 | out float64 | out spread |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, size, a, b in rows:
        f = lambda t: f"{t[0]:.2e} ({t[1]:.3g})"
        lines.append(f"| {name} | {size}x{size} | {a['npmask_params']:,} / {a['torch_params']:,} | {f(a['float32'])} | "
                     f"{f(a['float64'])} | {f(b['float32'])} | {f(b['float64'])} | {b['spread_float32']:.3g} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
