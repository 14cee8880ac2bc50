# %% [markdown]
r"""
# 4. Reading the masks

After training, a domain is a set of bits and scalars per layer. What did it learn? Section 4.3
of the paper reads two things off every convolution (figures 3 and 4, ResNet-50 and
DenseNet-121 on ImageNet-to-Sketch):

* the **density** of its mask, the percentage of ones in $M$ (how many pretrained weights keep
  their "on" form), and
* the values of $k_1$, $k_2$, $k_3$ in $\tilde W = k_0 W + k_1 \mathbf 1 + k_2 M + k_3\,W\circ M$.

Its observations: the full model keeps roughly half of each mask on; Piggyback's masks are denser
and get sparser with depth; $|k_2|$ and $|k_3|$ are larger than $|k_1|$, and $k_1$ and $k_2$
tend to have opposite signs, so $k_1\mathbf 1 + k_2 M$ spans both positive and negative
shifts; and the weights change more in deeper layers, which must represent the concepts of the
new domain.

Here we train two quite different synthetic domains (`digits` and `textures`) with the full model,
and `digits` with Piggyback, starting from the shipped backbone, and read the same quantities with
`npmask.masking.inspect`. A CPU budget of `STEPS` optimiser steps per domain (the first line
printed below) is a far cry from the paper's 60 epochs: what we see is the *beginning* of the
process, and the notebook prints the measured facts rather than assuming the paper's.
"""

# %%
import io
import os
import tempfile

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display
from PIL import Image as PILImage

from npmask import pretrained
from npmask.data.format import load_domain
from npmask.data.synthetic import ensure_synthetic
from npmask.masking import MaskedConv2d
from npmask.masking.inspect import mask_statistics, plot_mask_statistics
from npmask.multidomain import MultiDomainModel
from npmask.optim import SGD, Adam, Optimizers
from npmask.training.batches import make_iterators
from npmask.training.suites import get_benchmark
from npmask.training.loop import evaluate, train_epoch

QUICK = os.environ.get("NPMASK_TUTORIAL_QUICK") == "1"
plt.rcParams.update({"figure.dpi": 72, "font.size": 9})
STEPS = 12 if QUICK else 150                 # optimiser steps (batches of 32) per domain
# the notebook's files (domains, exports, plots) live as long as this kernel: deleted when it exits
workdir = tempfile.TemporaryDirectory(prefix="npmask-tutorial-")
out_dir = workdir.name

backbone, info = pretrained.load_backbone()
model = MultiDomainModel(backbone, base_domain="base")
sizes = {"n_train": 600, "n_test": 300} if QUICK else {}
root = ensure_synthetic(domains=("digits", "textures"), **sizes)
bench = get_benchmark("synthetic")
print(f"backbone {info['model']} (test accuracy {info['test_acc']:.1f}% on '{info['domain']}'); "
      f"{STEPS} steps per domain")

# %% [markdown]
r"""
## 4.1 Three short training runs

The same loop as in notebook 3 (Adam for masks, $k$'s and BN; SGD for the classifier; the
synthetic benchmark's rates), one epoch over `32 * STEPS` images.
"""

# %%
runs = {"digits (full)": ("digits", "full"),
        "textures (full)": ("textures", "full"),
        "digits (piggyback)": ("digits", "piggyback_bn")}

for run, (domain_name, variant) in runs.items():
    domain = load_domain(root / domain_name)
    train_it, test_it = make_iterators(domain, batch_size=32, seed=0, backend="numpy", dtype=np.float32,
                                       protocol=bench.augmentation, max_train=32 * STEPS, max_test=500)
    model.add_domain(run, num_classes=domain.num_classes, variant=variant, seed=0)
    model.set_domain(run)
    groups = model.parameter_groups()
    opt = Optimizers(body=Adam(groups["body"], lr=bench.lr_body),
                     head=SGD(groups["head"], lr=bench.lr_head, momentum=0.9))
    stats = train_epoch(model, train_it.epoch(0), opt, num_batches=len(train_it), progress=False)
    test = evaluate(model.network(run), test_it)
    print(f"{run:20s} {stats['steps']} steps in {stats['train_seconds']:4.0f} s: "
          f"test accuracy {test['acc']:5.1f}% ({domain.num_classes} classes)")

# %% [markdown]
r"""
## 4.2 Mask density and $k$'s per layer

`mask_statistics(network)` returns one row per masked layer, in network order: its shape, the
fraction of ones in $M = \mathbb 1[R \geq \tau]$, and every $k$ (fixed or learned).
`plot_mask_statistics` draws them the way figures 3 and 4 do: density against depth, and the
learned $k_1$, $k_2$, $k_3$ against depth (Piggyback learns no $k$, so it appears only in the
first panel).
"""

# %%
stats = {run: mask_statistics(model.network(run)) for run in runs}
print(f"{'layer':22s} {'shape':>16s}  density  k1       k2       k3")
for row in stats["digits (full)"]:
    print(f"{row['layer']:22s} {str(row['shape']):>16s}  {row['density']:.3f}  "
          f"{row['k1']:+.4f}  {row['k2']:+.4f}  {row['k3']:+.4f}")

n_masked = sum(isinstance(m, MaskedConv2d) for m in model.network("digits (full)").modules())
assert all(len(rows) == n_masked for rows in stats.values())
assert all(0.0 < r["density"] <= 1.0 for rows in stats.values() for r in rows)
assert all(r["learned"] == [] for r in stats["digits (piggyback)"])

png = plot_mask_statistics(stats, os.path.join(out_dir, "masks.png"),
                           title=f"WRN-16-1, {STEPS} steps per domain")
small = PILImage.open(png).convert("RGB")
small.thumbnail((1000, 300))                          # a lighter copy for the notebook file
buffer = io.BytesIO()
small.quantize(64).save(buffer, format="PNG", optimize=True)
display(Image(data=buffer.getvalue()))

# %% [markdown]
r"""
## 4.3 What the numbers say

First, did the masks move at all? Every run starts with all bits on; the fraction switched
off is the first thing to check (a run whose masks stay at 100% learned only batch norm and
the classifier).
"""

# %%
def depth_trend(values):
    """Slope of a least-squares line through (relative depth 0..1, value)."""
    depth = np.linspace(0, 1, len(values))
    return float(np.polyfit(depth, values, 1)[0])


for run, rows in stats.items():
    density = np.array([r["density"] for r in rows])
    print(f"{run:20s} mean density {100 * density.mean():5.1f}%  "
          f"(first layer {100 * density[0]:5.1f}%, last {100 * density[-1]:5.1f}%, "
          f"trend over depth {100 * depth_trend(density):+5.1f} points)")
    assert density.min() < 1.0, f"{run}: no bit moved"

for run in ("digits (full)", "textures (full)"):
    rows = stats[run]
    k1, k2, k3 = (np.array([r[k] for r in rows]) for k in ("k1", "k2", "k3"))
    opposite = np.mean(np.sign(k1) != np.sign(k2))
    print(f"{run:20s} mean |k1| {np.abs(k1).mean():.4f}, |k2| {np.abs(k2).mean():.4f}, "
          f"|k3| {np.abs(k3).mean():.4f}; k1 and k2 of opposite sign in {100 * opposite:.0f}% of layers")

# %% [markdown]
r"""
How to read these lines against the paper:

* **Density.** $R$ starts only $10^{-4}$ above the threshold, and Adam moves every entry by
  about one learning rate per step in the direction opposite to the sign of its gradient. So
  within the first steps each bit settles on whatever side its first gradients point to, and
  densities drop from 100% to about half almost at once (the first-layer and last-layer
  figures above); the rest of training decides *which* half. The paper's full model also
  ends near 50%. In the full model an off bit is not a deleted weight: it only misses the
  $k_2 + k_3 w$ that the "on" weights receive. For Piggyback an off bit *deletes* the weight,
  and in the paper's long runs its masks end denser, and sparser with depth; whether our few
  steps show that already, the Piggyback line above tells.
* **$k$'s.** $k_1$ shifts every weight of a layer and $k_2$ only those whose bit is on, so the
  "off" group moves by $k_1$ and the "on" group by $k_1 + k_2$: opposite directions when the
  signs differ *and* $|k_2| > |k_1|$. $k_3$ rescales the "on" weights.
* **Piggyback, same settings.** Its masks drop to about half just as fast, but for Piggyback
  that deletes half of every layer's pretrained weights within a few steps (below, every
  layer's relative change is near $\sqrt{1 - \text{density}}$, what deleting a random part of
  the weights gives); the pretrained features are gone before the bits can be
  sorted out, and in our short run its test accuracy stays far below the full model's (4.1).
  This is where the affine terms pay off: an off bit costs the full model little. It also
  shows why the starting point of $R$ matters (`mask_init` of `add_domain`): with $R$ further
  above $\tau$, a bit leaves the all-ones state only after its gradients agree for many steps.
* Our runs take seconds of CPU time each (printed in 4.1) instead of 60 epochs on a GPU: the
  trends may be weaker, or not there yet. Run `python -m npmask.train --epochs 10` to see them develop (its
  run folder gets the same plot for every domain).

**How much did each layer change?** The relative change
$\|\tilde W - W\|/\|W\|$ per layer is the paper's last observation (stronger adaptation in deeper
layers). It is computed from the masked layers directly:
"""

# %%
fig, ax = plt.subplots(figsize=(6, 2.6))
for run in runs:
    layers = [m for m in model.network(run).modules() if isinstance(m, MaskedConv2d)]
    change = [float(np.linalg.norm(m.transformed_weight() - m.weight) / np.linalg.norm(m.weight))
              for m in layers]
    ax.plot(range(1, len(change) + 1), change, marker="o", ms=3, label=run)
    print(f"{run:20s} relative change: first layer {change[0]:.3f}, last {change[-1]:.3f}, "
          f"trend over depth {depth_trend(change):+.3f}")
off = 1 - np.array([r["density"] for r in stats["digits (piggyback)"]])   # the deleted fraction
print(f"{'digits (piggyback)':20s} sqrt(1 - density): first layer {np.sqrt(off[0]):.3f}, "
      f"last {np.sqrt(off[-1]):.3f}")
ax.set(xlabel="layer (network order)", ylabel="||W~ - W|| / ||W||")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
r"""
## 4.4 One layer up close

The deepest convolution of `digits (full)`: each transformed weight against its pretrained
value, coloured by its bit (compare with the third panel of notebook 2's figure). Off bits give
$\tilde w = w + k_1$, on bits $\tilde w = (1 + k_3)\,w + k_1 + k_2$.
"""

# %%
net = model.network("digits (full)")
name, last = [(n, m) for n, m in net.named_modules() if isinstance(m, MaskedConv2d)][-1]
W, Wt, M = last.weight, last.transformed_weight(), last.mask()
_, k1, k2, k3 = last.ks
fig, ax = plt.subplots(figsize=(4, 3))
ax.scatter(W[~M], Wt[~M], s=1, label=f"bit 0 ({100 * (~M).mean():.0f}%)")
ax.scatter(W[M], Wt[M], s=1, label=f"bit 1 ({100 * M.mean():.0f}%)")
lim = float(np.abs(W).max())
ax.plot([-lim, lim], [-lim, lim], "k:", lw=0.8)
ax.set(title=f"{name}: k1={float(k1[0]):+.3f}, k2={float(k2[0]):+.3f}, k3={float(k3[0]):+.3f}",
       xlabel="pretrained w", ylabel="transformed w~")
ax.legend(markerscale=6, fontsize=8)
plt.tight_layout()
plt.show()
assert np.allclose(Wt[~M], W[~M] + k1[0], atol=1e-6)
assert np.allclose(Wt[M], (1 + k3[0]) * W[M] + k1[0] + k2[0], atol=1e-6)

# %% [markdown]
r"""
**What to remember**

* `mask_statistics` and `plot_mask_statistics` read a trained domain layer by layer: mask
  density and the $k$'s, the content of the paper's figures 3 and 4.
* In the full model an off bit is not a deleted weight; the mask splits a layer into two groups
  that the $k$'s shift and scale differently.
* The figures depend on how long a domain was trained: compare like with like.

Next: [5. The same code on a GPU](05_same_code_on_a_gpu.ipynb).
"""

# %% [markdown]
r"""
## Exercises

Solutions: `tutorials/solutions/ex04_masks.py` (the test suite checks them; try first).

**Exercise 4.1 — densities from the file alone.** A stored domain keeps each mask as packed bits
(`mask/<layer>` entries, `np.packbits`; the shapes are in the file's `__meta__`). Write
`densities_from_file(path)` that returns `{layer: fraction of ones}` using only
`npmask.storage.read_domain_file` and NumPy -- no network. The cell saves `digits (full)` and
compares your numbers with `mask_statistics`.

**Exercise 4.2 — the layer the domain changed most.** Write `most_changed_layer(densities)`,
returning the layer whose mask keeps the fewest weights and its density. Is it early or late in
the network for digits? Does the same hold for textures (save that domain too)?
"""

# %%
from npmask.storage import save_domain


def densities_from_file(path):
    """{layer: fraction of ones in its mask}, read from a domain file alone."""
    # TODO (exercise 4.1)
    return None


def most_changed_layer(densities):
    """(layer, density) of the layer with the fewest ones."""
    # TODO (exercise 4.2)
    return None


digits_file = save_domain(model, "digits (full)", os.path.join(out_dir, "digits_full.npz"))
mine = densities_from_file(digits_file)
if mine is None:
    print("exercise 4.1 is not done yet: fill in densities_from_file and run this cell again")
else:
    want = {r["layer"]: r["density"] for r in stats["digits (full)"]}
    print("largest difference from mask_statistics:", max(abs(mine[k] - want[k]) for k in want))
    if most_changed_layer(mine) is None:
        print("exercise 4.2 is not done yet: fill in most_changed_layer")
    else:
        print("the layer changed most:", most_changed_layer(mine))
