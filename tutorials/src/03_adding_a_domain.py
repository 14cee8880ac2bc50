# %% [markdown]
r"""
# 3. Adding a domain to a pretrained network

The setting of the paper (section 3.1): a network $f_0(\cdot\,;\Theta,\Omega_0)$ has been trained
on a large first domain (ImageNet in the paper). Its parameters split into $\Theta$, **shared**
and frozen forever, and $\Omega_0$, specific to that domain (the classifier). A new domain $i$
gets its own small set $\Omega_i$ and a network $f_i(\cdot\,;\Theta,\Omega_i)$ with the same
structure:

* every convolution keeps its pretrained $W \in \Theta$ and learns a binary mask and a few $k$'s
  (eq. 1, notebook 2);
* every batch norm gets its own copy (scale, shift, running statistics);
* a fresh classifier sized for the new classes.

Domains never interfere: adding one changes no bit of $\Theta$ or of any other domain. This
notebook does it end to end with npmask on the built-in synthetic benchmark: the shipped
WRN-16-1 (pretrained on the synthetic `base` domain, 60 classes of shapes) learns `digits`, a
house-number-like domain; we compare it with the cheapest baseline, a new classifier on frozen
features; and we store the domain and count what it costs.
"""

# %%
import os
import tempfile

import matplotlib.pyplot as plt
import numpy as np

from npmask import pretrained
from npmask.data.synthetic import ensure_synthetic
from npmask.data.format import load_domain
from npmask.masking import MaskedConv2d
from npmask.metrics import domain_file_bits, params_ratio
from npmask.multidomain import MultiDomainModel, fingerprint_arrays
from npmask.optim import SGD, Adam, Optimizers
from npmask.storage import load_domain as load_domain_file, save_domain
from npmask.training.batches import make_iterators
from npmask.training.suites import get_benchmark
from npmask.training.loop import evaluate, train_epoch

QUICK = os.environ.get("NPMASK_TUTORIAL_QUICK") == "1"
plt.rcParams.update({"figure.dpi": 72, "font.size": 9})
EPOCHS = 1 if QUICK else 2
MAX_TRAIN = 600 if QUICK else None           # None: all 5000 training images
# the notebook's files (domains, exports, plots) live as long as this kernel: deleted when it exits
workdir = tempfile.TemporaryDirectory(prefix="npmask-tutorial-")
out_dir = workdir.name

# %% [markdown]
r"""
## 3.1 The pretrained backbone and the new domain

`npmask.pretrained.load_backbone()` rebuilds the shipped network from its `.npz` weights and the
`.json` beside it, which records how it was trained (`python -m npmask.pretrain ...`) and its
test accuracy on the pretraining domain.
"""

# %%
backbone, info = pretrained.load_backbone()
print(f"{info['model']} pretrained on '{info['domain']}' ({info['num_classes']} classes): "
      f"test accuracy {info['test_acc']:.1f}%")
print("made by:", info["command"])

root = ensure_synthetic(domains=("digits",), n_train=600, n_test=300) if QUICK else ensure_synthetic(domains=("digits",))
digits = load_domain(root / "digits")
print(f"digits: {digits.num_classes} classes, {len(digits.train[1])} training and "
      f"{len(digits.test[1])} test images of {digits.image_size}, mirroring allowed: {digits.mirror}")

fig, axes = plt.subplots(1, 10, figsize=(8, 1.1))
for ax, img, label in zip(axes, digits.train[0][:10], digits.train[1][:10]):
    ax.imshow(img)
    ax.set_title(digits.class_names[label], fontsize=8)
    ax.axis("off")
plt.show()

# %% [markdown]
r"""
## 3.2 One backbone, several domains

`MultiDomainModel` freezes the backbone (and keeps it in eval mode) and builds, per domain, a
network that *refers* to the backbone's arrays instead of copying them. We add the same domain
twice, with two variants:

* `full`: eq. 1 in every convolution, domain batch norm, new classifier;
* `classifier_only`: the backbone as a fixed feature extractor, only a new classifier (the
  "Feature" row of the paper's table 4).

Before any training, the `full` network computes exactly the pretrained features: every bit
starts at 1 and $k = (1, 0, 0, 0)$, so $\tilde W = W$.
"""

# %%
model = MultiDomainModel(backbone, base_domain="base")
fingerprint_before = model.fingerprint()             # sha256 of every backbone array
model.add_domain("digits", num_classes=digits.num_classes, variant="full", seed=0)
model.add_domain("digits_features", num_classes=digits.num_classes, variant="classifier_only", seed=0)
print(model)

net = model.network("digits")
print(net.layer2[0])                                  # a residual block of the new domain
masked = [m for _, m in net.named_modules() if isinstance(m, MaskedConv2d)]
assert all(np.array_equal(m.transformed_weight(), m.weight) for m in masked)
print(f"{len(masked)} masked convolutions, each W~ == W at step 0")

for name in ("digits", "digits_features"):
    groups = model.parameter_groups(name)
    count = {g: sum(r.data.size for r in refs) for g, refs in groups.items()}
    print(f"{name:16s} trains {count['body']:7d} body numbers (masks R, k's, BN) + {count['head']} in the head")

# %% [markdown]
r"""
## 3.3 Training

The paper's protocol (section 4): Adam for the real-valued masks, the $k$'s and batch norm; SGD
with momentum 0.9 for the classifier; batch 32; crops and (where the domain allows) mirroring.
The paper's rates ($10^{-4}$ and $10^{-3}$) are meant for 60 epochs; a CPU run of a few epochs
takes far fewer steps, so the synthetic benchmark scales both by 10 and says why in the notes of
every run's `config.json` (printed below). One step is the textbook sequence that
`npmask.training.loop.train_epoch` runs:

```python
logits = model.forward(x)
loss, dlogits = softmax_cross_entropy(logits, y)
optimizer.zero_grad(); model.backward(dlogits); optimizer.step()
```
"""

# %%
bench = get_benchmark("synthetic")
print(f"learning rates: body (Adam) {bench.lr_body:g}, head (SGD) {bench.lr_head:g}")
print("notes:", bench.notes)
train_it, test_it = make_iterators(digits, batch_size=32, seed=0, backend="numpy", dtype=np.float32,
                                   protocol=bench.augmentation, max_train=MAX_TRAIN)


def train_domain(name, epochs=EPOCHS):
    """Train domain `name` of `model`; returns one record per epoch."""
    model.set_domain(name)
    groups = model.parameter_groups()
    optimisers = {"head": SGD(groups["head"], lr=bench.lr_head, momentum=0.9)}
    if groups["body"]:                                # classifier_only has no body parameters
        optimisers["body"] = Adam(groups["body"], lr=bench.lr_body)
    opt = Optimizers(**optimisers)
    history = []
    for epoch in range(epochs):
        stats = train_epoch(model, train_it.epoch(epoch), opt, num_batches=len(train_it), progress=False)
        test = evaluate(model.network(name), test_it)
        history.append({**stats, "test_acc": test["acc"]})
        print(f"{name:16s} epoch {epoch + 1}: train loss {stats['train_loss']:.3f}, "
              f"train acc {stats['train_acc']:5.1f}%, test acc {test['acc']:5.1f}% "
              f"({stats['train_seconds']:.0f} s)")
    return history


results = {name: train_domain(name) for name in ("digits", "digits_features")}

# %%
chance = 100 / digits.num_classes
acc = {name: h[-1]["test_acc"] for name, h in results.items()}
fig, ax = plt.subplots(figsize=(4.5, 2.4))
ax.barh(["masks + affine (full)", "classifier only"], [acc["digits"], acc["digits_features"]],
        color=["tab:orange", "tab:gray"])
ax.axvline(chance, color="k", ls=":", label="chance")
ax.set(xlabel="test accuracy on digits (%)", xlim=(0, 100))
ax.legend(loc="lower right")
plt.tight_layout()
plt.show()
assert all(np.isfinite(h[-1]["train_loss"]) for h in results.values())
if not QUICK:                                          # the quick test run is too short to learn
    assert acc["digits"] > max(2 * chance, acc["digits_features"] + 5), acc

# %% [markdown]
r"""
The pretrained features alone are a poor fit for digits (the backbone only ever saw shapes),
while the masked network adapts every layer with one bit per weight. And the backbone did not
change by a single bit:
"""

# %%
# fingerprint() caches its first answer, so hash the backbone's arrays as they are now
assert fingerprint_arrays(model.backbone_arrays()) == fingerprint_before
print("backbone fingerprint unchanged:", fingerprint_before[:16], "...")

# %% [markdown]
r"""
## 3.4 Storing a domain and what it costs

`npmask.storage.save_domain` writes exactly $\Omega_i$ to one `.npz`: the masks packed 8 bits per
byte (`np.packbits` of $M$; $R$ is not needed for inference), the learned $k$'s and batch norm,
and the classifier, plus the sha256 fingerprint of the backbone it belongs to. The paper's
"# Params" (footnote 3) counts what the domains add relative to the backbone, classifiers
excluded: with $N_p$ backbone parameters and $A_p$ bits added per domain, $T$ domains in all,

$$\#\text{Params} = 1 + \frac{A_p\,(T-1)}{32\,N_p}.$$

For comparison we also store an (untrained) fine-tuning domain, which must keep a full float32
copy of every weight.
"""

# %%
path = save_domain(model, "digits", os.path.join(out_dir, "digits.npz"))
model.add_domain("digits_finetune", num_classes=digits.num_classes, variant="finetune", seed=0)
path_ft = save_domain(model, "digits_finetune", os.path.join(out_dir, "digits_finetune.npz"))

bits = domain_file_bits(path)
bits_ft = domain_file_bits(path_ft)
n_p = bits["backbone_parameters"]
print(f"backbone: N_p = {n_p} parameters = {32 * n_p / 8 / 1024:.0f} KiB in float32")
for b, p in ((bits, path), (bits_ft, path_ft)):
    print(f"{b['variant']:9s}: {b['mask_bits'] / 8 / 1024:6.1f} KiB of mask bits + "
          f"{b['param_bits'] / 8 / 1024:6.1f} KiB of other parameters = "
          f"{b['bits_per_parameter']:5.2f} bits per backbone parameter "
          f"(file {os.path.getsize(p) / 1024:.0f} KiB with the classifier)")
print(f"BN running statistics of the full domain, stored for inference, not counted above: "
      f"{bits['running_stat_bits'] / 8 / 1024:.1f} KiB")
print(f"# Params with 9 such domains (T = 10, the Decathlon): masks {params_ratio([path] * 9):.3f}, "
      f"fine-tuning {params_ratio([path_ft] * 9):.2f}")
n_masked = sum(m.weight.size for m in masked)        # one bit each, padded to whole bytes per layer
assert n_masked <= bits["mask_bits"] < n_masked + 8 * len(masked)
assert bits_ft["bits_per_parameter"] == 32  # every parameter once; BN running statistics not counted

# %% [markdown]
r"""
The masks cost one bit per convolution weight. The rest is the domain's batch norm, its scale
and shift (two numbers per channel), and three $k$'s per convolution. The batch norm's running
mean and variance are stored too, since inference needs them, but the paper's count leaves them
out and so does `domain_file_bits` (the line printed apart). Scale, shift and $k$'s are a
visible share in a network as narrow as WRN-16-1 (16 to 64 channels), a small one in the WRN-28-4
of the Decathlon experiments or the paper's ResNet-50, where BN has far fewer numbers per weight
(the paper's table 4 reports # Params 1.29 for ten domains). Fine-tuning costs 32 bits per
backbone parameter, so nine domains make the model ten times larger.

**Loading it back.** The file needs the same backbone: load the shipped weights again into a new
model and add the stored domain. The forward pass reads only the bits, so the logits are
identical to the trained model's.
"""

# %%
fresh_backbone, _ = pretrained.load_backbone()
fresh = MultiDomainModel(fresh_backbone, base_domain="base")
load_domain_file(fresh, path)
images = next(iter(test_it))[0]
same = np.array_equal(fresh.predict(images, "digits"), model.predict(images, "digits"))
print("logits identical after save/load:", same, "| domains:", fresh.domains)
assert same

# %% [markdown]
r"""
**Starting from PyTorch weights, and going back.** The paper starts from ImageNet networks that
everyone has as PyTorch files. `npmask.convert` reads a torchvision/timm state_dict (here a
`.safetensors` file, written the way `safetensors.torch.save_file(model.state_dict(), ...)` writes
one; we make it with npmask's own ResNet-18, whose names and shapes are torchvision's) into an npmask
backbone; `npmask.export` turns a domain back into a dense state_dict, every masked weight replaced by
$\tilde W = k_0 W + k_1 + k_2 M + k_3 W \circ M$, that `torchvision.models.resnet18(num_classes=10)`
loads. Shell equivalents: `python -m npmask.convert r18.safetensors --model resnet18 --out r18.npz`
and `python -m npmask.export digits.npz --backbone r18.npz --out digits.safetensors`.
"""

# %%
from safetensors.numpy import load_file, save_file

from npmask.convert import convert
from npmask.export import export_domain
from npmask.models import create

r18 = create("resnet18", num_classes=1000, seed=0)             # stands in for torchvision weights
tv_state = dict(r18.state_dict())
tv_state.update({k.replace("running_var", "num_batches_tracked"): np.array(0, np.int64)
                 for k in r18.state_dict() if k.endswith("running_var")})   # as PyTorch saves BN
save_file(tv_state, os.path.join(out_dir, "r18.safetensors"))
info = convert(os.path.join(out_dir, "r18.safetensors"), "resnet18", os.path.join(out_dir, "r18.npz"),
               input_size=32, domain="imagenet-stand-in")
print(f"converted: {info['model']}, {info['num_classes']} classes, dropped {len(info['dropped'])} "
      "num_batches_tracked entries")

r18_backbone, _ = pretrained.load_backbone(os.path.join(out_dir, "r18.npz"))
tv_model = MultiDomainModel(r18_backbone, base_domain="imagenet")
net = tv_model.add_domain("digits", num_classes=10, variant="full", seed=0)
rng = np.random.default_rng(0)                  # stands in for training: some mask bits flipped
for m in net.modules():
    if isinstance(m, MaskedConv2d):
        m.params["mask_real"][...] = rng.uniform(-0.2, 1.0, m.params["mask_real"].shape)
save_domain(tv_model, "digits", os.path.join(out_dir, "r18-digits.npz"))
export_domain(os.path.join(out_dir, "r18-digits.npz"), os.path.join(out_dir, "r18.npz"),
              os.path.join(out_dir, "digits.safetensors"))

dense = load_file(os.path.join(out_dir, "digits.safetensors"))  # what torch would load (strict,
plain = create("resnet18", num_classes=10)                       # but for num_batches_tracked)
plain.load_state_dict(dense, strict=True)
x = images[:4].astype(np.float32)
diff = np.abs(plain.eval().forward(x) - tv_model.predict(x, "digits")).max()
print(f"{len(dense)} arrays exported; max |logit difference| plain model vs npmask domain: {diff:.2e}")
assert diff < 1e-4

# %% [markdown]
r"""
**What to remember**

* A domain is $\Omega_i$ only: masks, a few $k$'s per layer, its batch norm, its classifier. The
  backbone is shared by reference and never changes (its fingerprint proves it).
* Training a domain is an ordinary training loop over those parameters, with Adam for the body
  and SGD for the head.
* Stored, a domain costs about one bit per backbone weight, against 32 for fine-tuning.

The same in one command, for all five synthetic domains: `python -m npmask.train` (add
`--variant piggyback`, `--epochs 2`, ... to change the setting).

Next: [4. Reading the masks](04_reading_the_masks.ipynb).
"""

# %% [markdown]
r"""
## Exercises

Solutions: `tutorials/solutions/ex03_domain.py` (the test suite checks them; try first).

**Exercise 3.1 — one optimiser, the PyTorch way.** Add a domain `digits_one_opt` (variant
`full`) and train it with a single `Adam(model.parameters(), lr=1e-3)` instead of the paper's
two groups. `model.parameters()` also lists the frozen backbone weights: why is that harmless?
Compare its test accuracy with the two-optimiser run above.

**Exercise 3.2 — classify an image file.** Write `predict_image_file(model, domain, image,
folder)`: save the uint8 image as a PNG in `folder`, classify the *file* with `model.predict`,
and return the top class and its probability. `model.set_data_info` (done in the cell) gives the
domain its class names and normalisation, as `npmask.train` does for every domain file; the
command-line equivalent is `python -m npmask.predict RUN_DIR --domain digits image.png`.
"""

# %%
def train_with_one_optimizer(model, domain, train_it, test_it, epochs=1, lr=1e-3):
    """Train `domain` with one Adam over model.parameters(); returns its test accuracy (%)."""
    # TODO (exercise 3.1)
    return None


if "digits_one_opt" not in model.domains:           # the cell can be run again
    model.add_domain("digits_one_opt", digits.num_classes, "full", seed=0)
acc_one = train_with_one_optimizer(model, "digits_one_opt", train_it, test_it, epochs=EPOCHS)
if acc_one is None:
    print("exercise 3.1 is not done yet: fill in train_with_one_optimizer and run this cell again")
else:
    print(f"one Adam: {acc_one:.1f}% | Adam + SGD: {acc['digits']:.1f}%")

# %%
def predict_image_file(model, domain, image, folder):
    """Save `image` (uint8 H x W x C) as a PNG in `folder`, classify the file: (class, probability)."""
    # TODO (exercise 3.2)
    return None


model.set_data_info("digits", digits)
test_image, test_label = digits.test[0][0], digits.test[1][0]
answer = predict_image_file(model, "digits", test_image, out_dir)
if answer is None:
    print("exercise 3.2 is not done yet: fill in predict_image_file and run this cell again")
else:
    print(f"predicted {answer[0]} ({answer[1]:.2f}), true class {digits.class_names[test_label]}")
