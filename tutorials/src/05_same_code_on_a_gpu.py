# %% [markdown]
r"""
# 5. The same code on a GPU

CuPy is a NumPy look-alike whose arrays live in the memory of an NVIDIA GPU: `cupy.zeros`,
`cupy.matmul`, slicing, broadcasting and `+=` behave as in NumPy, and each call runs as a GPU
kernel. npmask uses that to run **one** implementation on both:

* no module imports `numpy as xp` or `cupy as xp` at the top. A function asks its inputs which
  library they belong to, `xp = get_array_module(x)`, and calls `xp.<function>`: the arrays
  decide where the arithmetic happens;
* only functions that exist in both libraries are used (a test scans every `xp.<name>` in
  npmask and checks it in CuPy), and the code avoids scattered atomic additions (`xp.add.at`),
  so a GPU run is deterministic too;
* CuPy is imported lazily, the first time someone asks for it, and a missing package or a
  missing GPU give one clear `BackendError`.

This notebook finds out whether this machine has a usable GPU. If it has, everything below runs
on it; if not, it says so and runs the very same cells on NumPy.
"""

# %%
import os
import time

import numpy as np

from npmask import backend, models
from npmask.backend import backend_name, get_array_module, to_device, to_numpy
from npmask.gradcheck import rel_error
from npmask.multidomain import MultiDomainModel
from npmask.nn import softmax_cross_entropy
from npmask.optim import SGD, Adam, Optimizers

QUICK = os.environ.get("NPMASK_TUTORIAL_QUICK") == "1"

# %%
try:
    backend.get_backend("cupy")
    BACKEND = "cupy"
    import cupy
    print("CuPy can use the GPU:", cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())
except backend.BackendError as err:
    BACKEND = "numpy"
    print("No usable GPU here, so this notebook runs on NumPy. What CuPy said:\n")
    print(err)
print("\nbackend:", BACKEND)

# %% [markdown]
r"""
## 5.1 Where an array lives decides where the code runs

`get_backend(name)` returns the module (`numpy` or `cupy`); `to_device(a, name)` copies an
array there (no copy if it already is); `to_numpy(a)` brings it back to the host, which is what
printing, plotting and saving need; `get_array_module(a)` and `backend_name(a)` tell where an
array is. A function written against `xp` runs wherever its input is:
"""

# %%
def log_softmax(z):
    """Row-wise log-softmax, max-subtracted so that exp never overflows; z (N, K)."""
    xp = get_array_module(z)
    z = z - z.max(axis=1, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))


z_host = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
z_dev = to_device(z_host, BACKEND)
out = log_softmax(z_dev)
print(type(out).__module__, backend_name(out), out.dtype)
assert backend_name(out) == BACKEND
assert rel_error(to_numpy(out), log_softmax(z_host)) < 1e-6

# %% [markdown]
r"""
## 5.2 A whole network: `.to(backend)` and nothing else changes

A `Module` moves every array of its subtree with `.to("cupy")` (parameters, gradients,
batch-norm statistics); `MultiDomainModel.to` moves the shared backbone and every domain. The
optimisers keep references to the arrays, so **create them after moving the model**; their
state (Adam moments, momentum buffers) is then allocated on the same device.

Below, two copies of the same network (a WRN-16-1 backbone with one masked domain, the paper's
*full* variant) are built from the same seeds: one stays on NumPy as the reference, the other
goes to `BACKEND`. The training loop is written once and used for both.
"""

# %%
def make_model(where):
    net = models.create("wrn16_1", num_classes=60, input_size=32, seed=0)
    model = MultiDomainModel(net)
    model.add_domain("toy", num_classes=10, variant="full", seed=1)
    model.set_domain("toy")
    model.to(where)                                    # first move...
    groups = model.parameter_groups()
    opt = Optimizers(body=Adam(groups["body"], lr=1e-3),              # ...then build optimisers
                     head=SGD(groups["head"], lr=1e-2, momentum=0.9))
    return model, opt


def train_steps(model, opt, x, y, steps):
    """The textbook step, identical for every backend; returns the losses (Python floats)."""
    model.train()
    losses = []
    for _ in range(steps):
        logits = model.forward(x)
        loss, dlogits = softmax_cross_entropy(logits, y)
        opt.zero_grad()
        model.backward(dlogits)
        opt.step()
        losses.append(float(loss))                    # float() copies one number to the host
    return losses


data = np.random.default_rng(2)
x_host = data.standard_normal((32, 3, 32, 32)).astype(np.float32)
y_host = data.integers(0, 10, size=32)
steps = 2 if QUICK else 5

ref_model, ref_opt = make_model("numpy")
dev_model, dev_opt = make_model(BACKEND)
x_dev, y_dev = to_device(x_host, BACKEND), to_device(y_host, BACKEND)

ref_losses = train_steps(ref_model, ref_opt, x_host, y_host, steps)
dev_losses = train_steps(dev_model, dev_opt, x_dev, y_dev, steps)
print("numpy  ", np.round(ref_losses, 5))
print(BACKEND.ljust(7), np.round(dev_losses, 5))

# %% [markdown]
r"""
**Same numbers, up to rounding.** On the GPU the matrix products add their terms in another
order than OpenBLAS does, so float32 results agree up to rounding (the relative differences
printed below), not bit for bit; on NumPy the two copies are identical. The check compares the losses, the coefficients $k$ of one
layer, and its binary mask $M = 1[R \geq 0]$ (Adam moves every entry of $R$ by about the learning
rate, against the sign of its gradient, so an entry whose gradient is zero up to
rounding may step differently on the two devices: we ask for 99.9% of equal bits).
"""

# %%
layer = "layer2.0.conv1"
ref_state = ref_model.network().state_dict()
dev_state = dev_model.network().state_dict()
for key in (f"{layer}.k1", f"{layer}.k2", f"{layer}.k3"):
    err = rel_error(to_numpy(dev_state[key]), ref_state[key])
    print(f"{key:20s} on {backend_name(dev_state[key])}: relative difference to NumPy {err:.1e}")
    assert err < 1e-3
mask_dev, mask_ref = to_numpy(dev_state[f"{layer}.mask_real"]) >= 0, ref_state[f"{layer}.mask_real"] >= 0
same_bits = np.mean(mask_dev == mask_ref)
print(f"{layer} mask bits equal on both: {100 * same_bits:.2f}%")
assert same_bits >= 0.999
assert np.allclose(dev_losses, ref_losses, rtol=1e-4)
if BACKEND == "numpy":
    assert dev_losses == ref_losses                   # same library, same order of operations

# %% [markdown]
r"""
## 5.3 Data: batches straight onto the device

The batch iterator does the crop and flip on the CPU in `uint8`, copies that (four times less
data than float32) to the device and normalises it there: `BatchIterator(..., backend=BACKEND)`
yields `(x, y)` already on the device.
"""

# %%
from npmask.data.loader import Augmentation, BatchIterator

images = data.integers(0, 256, size=(100, 32, 32, 3), dtype=np.uint8)
labels = data.integers(0, 10, size=100)
it = BatchIterator(images, labels, batch_size=32, shuffle=True, drop_last=True, seed=0,
                   augmentation=Augmentation(padding=4, random_crop=True, mirror=True),
                   mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], backend=BACKEND)
xb, yb = next(iter(it.epoch(0)))
print("batch", xb.shape, xb.dtype, "on", backend_name(xb), "| labels on", backend_name(yb))
assert backend_name(xb) == backend_name(yb) == BACKEND

# %% [markdown]
r"""
## 5.4 Timing one training step

A GPU pays off when there is enough arithmetic per kernel launch: a batch of 32 images of
32×32 pixels through WRN-16-1 is tiny for an H100, the 64×64 Decathlon images through WRN-28-4
are not. GPU calls return before the work is done, so the clock is read only after
`synchronize()`.
"""

# %%
def step_time(model, opt, x, y, repeats):
    sync = (lambda: cupy.cuda.Device().synchronize()) if backend_name(x) == "cupy" else (lambda: None)
    train_steps(model, opt, x, y, 1)                  # warm-up (CuPy compiles kernels on first use)
    sync()
    t0 = time.perf_counter()
    train_steps(model, opt, x, y, repeats)
    sync()
    return (time.perf_counter() - t0) / repeats


repeats = 1 if QUICK else 3
t_ref = step_time(ref_model, ref_opt, x_host, y_host, repeats)
print(f"numpy: {1000 * t_ref:7.1f} ms per training step (batch 32, WRN-16-1, full variant)")
if BACKEND == "cupy":
    t_dev = step_time(dev_model, dev_opt, x_dev, y_dev, repeats)
    print(f"cupy:  {1000 * t_dev:7.1f} ms per training step")
else:
    print("cupy:  no GPU on this machine")

# %% [markdown]
r"""
## 5.5 What changes and what does not

| | NumPy | CuPy |
|---|---|---|
| the layers, the mask transform, the optimisers, the training loop | the same code | the same code |
| choosing the device | default | `model.to("cupy")`, `BatchIterator(..., backend="cupy")`, `train ... --backend cupy` |
| optimisers | create after `.to()` | create after `.to()` |
| printing, plotting, `.npz` files | direct | `to_numpy(a)` / `float(a)` copy to the host (`save_domain` does it for you) |
| mixing arrays of both kinds in one operation | — | an error: move one of them first |
| results | bit-for-bit reproducible | equal to NumPy up to float rounding; npmask itself uses no atomic adds |
| missing GPU or driver | — | `BackendError` naming the problem, before any work starts |

Installing CuPy: `pip install 'npmask[cuda12]'` (or `[cuda13]`, matching the driver's CUDA
version as `nvidia-smi` reports it).

Back to the start: [1. Backprop by hand](01_backprop_by_hand.ipynb).
"""

# %% [markdown]
r"""
## Exercises

Solutions: `tutorials/solutions/ex05_gpu.py` (the test suite checks them; try first).

**Exercise 5.1 — one softmax for both backends.** Write `softmax(logits)` for (N, K) logits that
runs on NumPy and CuPy arrays alike, in the input's dtype, without an `if` on the backend (take
the array module from the input, as `log_softmax` above does). Subtract the row maximum first:
what goes wrong with logits around 1000 if you do not?

**Exercise 5.2 — where does a model live?** Write `backends_of(module)`, the set of backend names
of every array in `module.state_dict()`. After `model.to("cupy")` it should be `{"cupy"}`; a
mixed set means some array was left behind, which the next forward pass would reject.
"""

# %%
def softmax(logits):
    """Row-wise softmax of (N, K) logits, on their backend and in their dtype."""
    # TODO (exercise 5.1)
    return None


def backends_of(module):
    """The backend names of the arrays of module.state_dict()."""
    # TODO (exercise 5.2)
    return None


big = to_device(np.array([[1000.0, 1001.0, 999.0]], dtype=np.float32), BACKEND)
p = softmax(big)
if p is None:
    print("exercise 5.1 is not done yet: fill in softmax and run this cell again")
else:
    print("softmax of logits near 1000:", to_numpy(p), "on", backend_name(p))
where = backends_of(ref_model.network())
print("exercise 5.2 is not done yet: fill in backends_of" if where is None
      else f"the reference model's arrays live on: {where}")
