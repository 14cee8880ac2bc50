# %% [markdown]
r"""
# 1. Backprop by hand: a linear layer and a convolution

npmask has no automatic differentiation. Every layer is an object with two methods:

* `y = layer.forward(x)` computes the output and **caches** what the backward pass will need;
* `dx = layer.backward(dy)` receives the *upstream gradient* $\partial L/\partial y$ (whatever
  the loss $L$ is), returns $\partial L/\partial x$ and **adds** the gradients of the layer's own
  parameters into `layer.grads`.

This notebook writes out the backward pass of the two layers that carry almost all the arithmetic
of a network, a fully connected layer and a 2-D convolution, checks npmask's code against those
formulas and against finite differences, and shows the trick (*im2col*) that turns a convolution
into one matrix product.

**The one rule.** If $y = f(x)$ and $L$ depends on $x$ only through $y$, the chain rule gives,
entry by entry,

$$\frac{\partial L}{\partial x_i} = \sum_j \frac{\partial L}{\partial y_j}\,\frac{\partial y_j}{\partial x_i}.$$

A backward pass is this sum, organised so that it is fast: every $x_i$ collects a contribution
from every output $y_j$ it helped to compute.
"""

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

from npmask.gradcheck import check_layer, numeric_gradient, rel_error
from npmask.nn import Conv2d, Linear, conv2d_backward, conv2d_forward
from npmask.nn.conv_reference import conv2d_forward_naive

QUICK = os.environ.get("NPMASK_TUTORIAL_QUICK") == "1"   # the test suite runs a shrunk version
plt.rcParams.update({"figure.dpi": 72, "font.size": 9})
rng = np.random.default_rng(0)

# %% [markdown]
r"""
## 1.1 The fully connected layer

Shapes as in PyTorch: input $x \in \mathbb{R}^{N\times D}$ (a batch of $N$ rows), weight
$W \in \mathbb{R}^{O\times D}$, bias $b \in \mathbb{R}^{O}$, output $y \in \mathbb{R}^{N\times O}$:

$$y_{no} = \sum_d x_{nd}\,W_{od} + b_o \qquad\Longleftrightarrow\qquad y = x W^\top + b.$$

With $G = \partial L/\partial y$ (shape $N\times O$), the rule above gives, because
$\partial y_{no}/\partial x_{nd} = W_{od}$, $\partial y_{no}/\partial W_{od} = x_{nd}$ and
$\partial y_{no}/\partial b_o = 1$:

$$\frac{\partial L}{\partial x_{nd}} = \sum_o G_{no} W_{od}, \qquad
\frac{\partial L}{\partial W_{od}} = \sum_n G_{no} x_{nd}, \qquad
\frac{\partial L}{\partial b_o} = \sum_n G_{no},$$

that is $\;dx = G\,W,\quad dW = G^\top x,\quad db = \textstyle\sum_n G_{n\cdot}$. Each gradient
has the shape of the thing it is the gradient of; that alone fixes where the transposes go.

Below, npmask's `Linear` in float64 (finite differences need the precision), a random upstream
gradient, and the three formulas typed by hand.
"""

# %%
layer = Linear(in_features=5, out_features=3, rng=0).astype(np.float64)
x = rng.standard_normal((4, 5))
G = rng.standard_normal((4, 3))          # random, not all ones: a wrong transpose cannot hide

y = layer.forward(x)
dx = layer.backward(G)                   # returns dL/dx, accumulates grads["weight"], grads["bias"]

W, b = layer.params["weight"], layer.params["bias"]
assert np.allclose(y, x @ W.T + b)
assert np.allclose(dx, G @ W)
assert np.allclose(layer.grads["weight"], G.T @ x)
assert np.allclose(layer.grads["bias"], G.sum(axis=0))
print("y", y.shape, " dx", dx.shape, " dW", layer.grads["weight"].shape, " db", layer.grads["bias"].shape)

# %% [markdown]
r"""
**Checking with finite differences.** How do we know the formulas themselves are right? Take
the scalar $L(x) = \sum_{n,o} y_{no}(x)\,G_{no}$: its gradient is exactly `backward(G)`. A
central difference approximates each entry,

$$\frac{\partial L}{\partial x_i} \approx \frac{L(x + h e_i) - L(x - h e_i)}{2h},$$

with an error of order $h^2$. `npmask.gradcheck.numeric_gradient` does this loop;
`check_layer` does it for the input and every trained parameter and reports the relative
error $\max|a-b| / \max(|a|+|b|)$.
"""

# %%
numeric_dx = numeric_gradient(lambda: layer.forward(x), x, G)
print(f"dx: relative error {rel_error(dx, numeric_dx):.1e}")
assert rel_error(dx, numeric_dx) < 1e-8

report = check_layer(layer, x, upstream=G)    # raises AssertionError if any gradient is off
print(report)

# %% [markdown]
r"""
Note that `backward` **accumulates** (`grads[name] += ...`): two backward passes without
`zero_grad()` give twice the gradient. This is what PyTorch does too, and it is what lets a
parameter used twice (or a batch split into pieces) collect all its contributions.
"""

# %%
layer.zero_grad()
layer.forward(x); layer.backward(G)
layer.forward(x); layer.backward(G)
assert np.allclose(layer.grads["weight"], 2 * G.T @ x)

# %% [markdown]
r"""
## 1.2 The convolution, written as loops

A 2-D convolution layer (a cross-correlation, as in every deep-learning library) with input
$x \in \mathbb{R}^{N\times C\times H\times W}$, weight $W \in \mathbb{R}^{O\times C\times k_h
\times k_w}$, stride $s$ and zero padding $p$ ($\bar x$ is the padded input):

$$y_{n,o,i,j} = b_o + \sum_{c=1}^{C}\sum_{u=0}^{k_h-1}\sum_{v=0}^{k_w-1}
W_{o,c,u,v}\;\bar x_{n,c,\,s i+u,\,s j+v}, \qquad H_o = \left\lfloor\frac{H + 2p - k_h}{s}\right\rfloor + 1.$$

Output $(i, j)$ looks at a $C\times k_h\times k_w$ window of the input (its *receptive field*)
and takes a dot product with one filter. Here it is as plain loops, next to npmask's fast
`conv2d_forward`:
"""

# %%
def conv_loops(x, weight, stride=1, padding=0):
    """y[n, o, i, j] = sum_{c,u,v} weight[o, c, u, v] * xpad[n, c, s*i + u, s*j + v] (no bias)."""
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    xpad = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    y = np.zeros((n, o, ho, wo))
    for i in range(ho):
        for j in range(wo):
            window = xpad[:, :, stride * i:stride * i + kh, stride * j:stride * j + kw]  # (N, C, kh, kw)
            y[:, :, i, j] = np.einsum("ncuv,ocuv->no", window, weight)
    return y


x = rng.standard_normal((2, 3, 7, 7))
weight = rng.standard_normal((4, 3, 3, 3))
y_fast, _ = conv2d_forward(x, weight, None, stride=2, padding=1)
assert np.allclose(conv_loops(x, weight, stride=2, padding=1), y_fast)
assert np.allclose(conv2d_forward_naive(x, weight, None, 2, 1), y_fast)  # npmask's own reference
print("output shape", y_fast.shape)

# %% [markdown]
r"""
## 1.3 im2col: a convolution is a matrix product

The loops above are slow because each of the $H_o W_o$ windows is a separate small product.
*im2col* ("image to columns") copies every receptive field into one **column** of a matrix,

$$\text{cols}\big[(c,u,v),\,(n,i,j)\big] = \bar x_{n,c,\,si+u,\,sj+v}
\qquad \text{shape } (C k_h k_w)\times(N H_o W_o),$$

and flattens each filter into one **row** of $W_{\text{mat}} \in \mathbb{R}^{O\times C k_h k_w}$.
Then every output is a row-times-column product, and the whole layer is **one GEMM**:

$$Y_{\text{mat}} = W_{\text{mat}}\;\text{cols}\qquad (O\times N H_o W_o).$$

The picture: a single-channel $4\times 4$ image with pixels numbered 0..15 and a $3\times 3$
kernel give four output positions, so four columns of nine entries. A pixel appears in as many
columns as there are windows covering it (pixel 5 is in all four).
"""

# %%
def im2col(x, kh, kw, stride=1, padding=0):
    """cols (C*kh*kw, N*Ho*Wo): one strided copy per kernel offset (u, v), as npmask.nn.conv does."""
    n, c, h, w = x.shape
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    xpad = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    cols = np.empty((c, kh, kw, n, ho, wo), dtype=x.dtype)
    for u in range(kh):
        for v in range(kw):
            # the input pixel that offset (u, v) of every window sees
            cols[:, u, v] = xpad[:, :, u:u + stride * (ho - 1) + 1:stride,
                                 v:v + stride * (wo - 1) + 1:stride].transpose(1, 0, 2, 3)
    return cols.reshape(c * kh * kw, n * ho * wo)


image = np.arange(16.0).reshape(1, 1, 4, 4)
cols = im2col(image, 3, 3)
print(cols.astype(int))

colours = ["tab:red", "tab:blue", "tab:green", "tab:orange"]
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(8, 3.4), gridspec_kw={"width_ratios": [1, 1.3]})
ax0.imshow(image[0, 0], cmap="Greys", vmin=-10, vmax=70)
for k in range(16):
    ax0.text(k % 4, k // 4, k, ha="center", va="center", fontsize=11)
for col, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
    d = 0.06 * col
    ax0.add_patch(plt.Rectangle((j - 0.45 + d, i - 0.45 + d), 2.9 - 2 * d, 2.9 - 2 * d,
                                fill=False, lw=2, ec=colours[col]))
ax0.set_title("input 4x4, the four 3x3 windows")
ax0.axis("off")
ax1.imshow(cols, cmap="Greys", vmin=-10, vmax=70, aspect="auto")
for r in range(9):
    for col in range(4):
        ax1.text(col, r, int(cols[r, col]), ha="center", va="center", color=colours[col], fontsize=10)
ax1.set_xticks(range(4), [f"y[{i},{j}]" for i, j in [(0, 0), (0, 1), (1, 0), (1, 1)]])
ax1.set_yticks(range(9), [f"(u={u},v={v})" for u in range(3) for v in range(3)])
ax1.set_title("cols: one column per output position")
plt.tight_layout()
plt.show()

# %% [markdown]
r"""
The matrix product reproduces the convolution exactly, for any stride and padding:
"""

# %%
n, c, o, k = x.shape[0], x.shape[1], weight.shape[0], weight.shape[2]
stride = 2
cols = im2col(x, k, k, stride=stride, padding=1)
W_mat = weight.reshape(o, c * k * k)
ho = wo = y_fast.shape[2]
Y_mat = W_mat @ cols                                        # (O, N*Ho*Wo): the whole layer
y_gemm = Y_mat.reshape(o, n, ho, wo).transpose(1, 0, 2, 3)  # back to (N, O, Ho, Wo)
assert np.allclose(y_gemm, y_fast)
print(f"cols {cols.shape}: {cols.size} numbers copied from an input of {x.size}, "
      f"{cols.size / x.size:.2f} per input number (large-image estimate k*k/s^2 = {k * k / stride**2:.2f})")

# %% [markdown]
r"""
The price is memory: the columns hold $k_h k_w$ numbers per output position, so
$k_h k_w\,H_o W_o/(H W)$ per input number, about $k_h k_w / s^2$ on a large image. On our small
image the padding border adds windows, so the printout above finds more than the estimate; a
$3\times 3$ kernel with stride 1 and padding 1 ($H_o = H$) makes the columns exactly nine times
the size of the input. npmask's `conv2d_forward` therefore builds the columns for a few images
at a time, so they are still in the CPU cache when the GEMM reads them (see the docstring of
`npmask/nn/conv.py`).

## 1.4 The backward pass of the convolution

Differentiate the sum in 1.2 term by term. $y_{n,o,i,j}$ contains the product
$W_{o,c,u,v}\,\bar x_{n,c,si+u,sj+v}$ once, so with $G = \partial L/\partial y$:

$$\frac{\partial L}{\partial W_{o,c,u,v}} = \sum_{n,i,j} G_{n,o,i,j}\;\bar x_{n,c,\,si+u,\,sj+v},
\qquad
\frac{\partial L}{\partial \bar x_{n,c,\,si+u,\,sj+v}} \mathrel{+}= \sum_o G_{n,o,i,j}\,W_{o,c,u,v},
\qquad \frac{\partial L}{\partial b_o} = \sum_{n,i,j} G_{n,o,i,j}.$$

In the im2col layout these are again matrix products, exactly those of the linear layer with
`cols` playing the role of $x^\top$:

$$dW_{\text{mat}} = G_{\text{mat}}\;\text{cols}^\top, \qquad
d\,\text{cols} = W_{\text{mat}}^\top\,G_{\text{mat}}, \qquad
G_{\text{mat}}\big[o, (n,i,j)\big] = G_{n,o,i,j}.$$

The last step, *col2im*, sends every entry of $d\,\text{cols}$ back to the input pixel it was
copied from and **adds** it there: the adjoint of the copy. Like im2col it is one strided-slice
`+=` per kernel offset, which is deterministic (no scattered atomic adds).
"""

# %%
def col2im(dcols, x_shape, kh, kw, stride=1, padding=0):
    """The adjoint of im2col: add each column entry back onto the pixel it came from."""
    n, c, h, w = x_shape
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    dcols = dcols.reshape(c, kh, kw, n, ho, wo)
    dxpad = np.zeros((n, c, h + 2 * padding, w + 2 * padding))
    for u in range(kh):
        for v in range(kw):
            dxpad[:, :, u:u + stride * (ho - 1) + 1:stride,
                  v:v + stride * (wo - 1) + 1:stride] += dcols[:, u, v].transpose(1, 0, 2, 3)
    return dxpad[:, :, padding:padding + h, padding:padding + w]


G = rng.standard_normal(y_fast.shape)
G_mat = G.transpose(1, 0, 2, 3).reshape(o, -1)
dW_hand = (G_mat @ cols.T).reshape(weight.shape)
dx_hand = col2im(W_mat.T @ G_mat, x.shape, k, k, stride=2, padding=1)

_, cache = conv2d_forward(x, weight, None, stride=2, padding=1)
dx_lib, dW_lib, _ = conv2d_backward(G, cache)
assert np.allclose(dW_hand, dW_lib) and np.allclose(dx_hand, dx_lib)
print("hand-written im2col backward == npmask.nn.conv2d_backward")

# %% [markdown]
r"""
**A second look at $dx$ for stride 1.** Substituting $a = i+u$ in the input-gradient sum gives
$\partial L/\partial \bar x_{n,c,a,b} = \sum_{o,u,v} W_{o,c,u,v}\,G_{n,o,a-u,b-v}$: a convolution
of $G$ (zero-padded by $k-1-p$) with the kernel flipped in both spatial axes and its in/out
channels swapped. npmask uses exactly this for stride 1, so the backward pass reuses the fast
forward code instead of col2im:
"""

# %%
x1 = rng.standard_normal((2, 3, 6, 6))
y1, cache1 = conv2d_forward(x1, weight, None, stride=1, padding=1)
G1 = rng.standard_normal(y1.shape)
w_flipped = weight.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]          # (C, O, kh, kw)
dx_as_conv, _ = conv2d_forward(G1, np.ascontiguousarray(w_flipped), None, stride=1, padding=3 - 1 - 1)
assert np.allclose(dx_as_conv, conv2d_backward(G1, cache1)[0])
print("stride-1 dx is the convolution of dy with the flipped kernel")

# %% [markdown]
r"""
## 1.5 The layer, checked by finite differences

Finally the `Conv2d` layer itself, with a bias, stride 2 and padding 1, through `check_layer`:
the input gradient and both parameter gradients against central differences, in float64. The
same check runs in the test suite on random shapes, strides and paddings drawn by hypothesis
(`test_conv2d_layer_gradcheck` in tests/test_conv.py).
"""

# %%
conv = Conv2d(3, 4, kernel_size=3, stride=2, padding=1, bias=True, rng=1).astype(np.float64)
x_small = rng.standard_normal((2, 3, 5, 5) if QUICK else (2, 3, 7, 7))
report = check_layer(conv, x_small, seed=3)
print(report)
assert report.ok and set(report.errors) == {"x", "weight", "bias"}

# %% [markdown]
r"""
And one way to *fail* the check, so we know it can: a backward pass whose weight gradient has its
columns in the wrong order. (A forgotten transpose, $x^\top G$ instead of $G^\top x$, fails even
earlier here: its shape $D\times O$ is not the weight's $O\times D$, and NumPy refuses the `+=`
into `grads["weight"]`.)
"""

# %%
class BrokenLinear(Linear):
    def backward(self, dy):
        self.accumulate_grad("weight", (dy.T @ self._x)[:, ::-1])   # columns reversed: wrong
        self.accumulate_grad("bias", dy.sum(axis=0))
        return dy @ self.params["weight"]


broken = BrokenLinear(5, 3, rng=0).astype(np.float64)
bad = check_layer(broken, rng.standard_normal((4, 5)), raise_on_fail=False)
print(bad)
assert not bad.ok and bad.errors["weight"] > 1e-2 and bad.errors["x"] < 1e-8

# %% [markdown]
r"""
**What to remember**

* A backward pass is the chain rule organised as matrix products; every gradient has the shape
  of its variable, which fixes the transposes.
* im2col turns a convolution into one GEMM, $Y = W_{\text{mat}}\,\text{cols}$; its backward pass
  is the linear layer's ($dW = G\,\text{cols}^\top$, $d\,\text{cols} = W^\top G$) plus col2im.
* Check every hand-written gradient numerically, in float64, with a random upstream gradient.

Next: [2. Binary masks and surrogate gradients](02_binary_masks_and_surrogate_gradients.ipynb).
"""

# %% [markdown]
r"""
## Exercises

Solutions: `tutorials/solutions/ex01_backprop.py` (the test suite checks them; try first).

**Exercise 1.1 — batch norm's backward pass.** In training mode batch norm normalises every
channel with the mean and (biased) variance of the batch,
$\hat x = (x - \mu_c)/\sqrt{\sigma_c^2 + \epsilon}$, $y = w_c \hat x + b_c$. Both $\mu_c$ and
$\sigma_c^2$ depend on *every* $x$ of the channel, so $\partial L/\partial x$ has more than one
term. Derive it with the rule of section 1.1 and fill in `batchnorm_backward` below;
`MyBatchNorm2d` uses it, and the cell runs `check_layer` on it (all three errors should be tiny).

**Exercise 1.2 — a convolution's backward pass as loops.** Write `conv2d_backward_loops` with
plain loops over the output positions: each output $y_{n,o,i,j}$ is the dot product of
$W_o$ with one input window, so that window receives $G_{n,o,i,j}\,W_o$ and $W_o$ receives
$G_{n,o,i,j}$ times the window. Handle `stride` and `padding`; the cell compares your three
gradients with npmask's im2col version (in float64 they agree to rounding: ok under 1e-9).
"""

# %%
from npmask.nn import BatchNorm2d


def batchnorm_backward(dy, x, weight, eps=1e-5):
    """(dx, dweight, dbias) of batch norm in training mode; x and dy (N, C, H, W), weight (C,)."""
    # TODO (exercise 1.1): per-channel batch mean and variance, x-hat, then the three gradients
    return None


class MyBatchNorm2d(BatchNorm2d):
    """npmask's forward pass with your backward pass."""

    def forward(self, x):
        self._x = x
        return super().forward(x)

    def backward(self, dy):
        dx, dweight, dbias = batchnorm_backward(dy, self._x, self.params["weight"], self.eps)
        self.accumulate_grad("weight", dweight)
        self.accumulate_grad("bias", dbias)
        return dx


x_bn = rng.standard_normal((4, 3, 5, 5)) * 2 + 1
if batchnorm_backward(x_bn, x_bn, np.ones(3)) is None:
    print("exercise 1.1 is not done yet: fill in batchnorm_backward and run this cell again")
else:
    print(check_layer(MyBatchNorm2d(3).astype(np.float64), x_bn, seed=1, raise_on_fail=False))

# %%
def conv2d_backward_loops(dy, x, weight, stride=1, padding=0):
    """(dx, dweight, dbias) of y = conv2d(x, weight) + bias, by loops over the output positions."""
    # TODO (exercise 1.2)
    return None


x_ex = rng.standard_normal((2, 3, 6, 5))
w_ex = rng.standard_normal((4, 3, 3, 3))
y_ex, cache_ex = conv2d_forward(x_ex, w_ex, np.zeros(4), 2, 1)
dy_ex = rng.standard_normal(y_ex.shape)
mine = conv2d_backward_loops(dy_ex, x_ex, w_ex, stride=2, padding=1)
if mine is None:
    print("exercise 1.2 is not done yet: fill in conv2d_backward_loops and run this cell again")
else:
    for what, a, b in zip(("dx", "dweight", "dbias"), mine, conv2d_backward(dy_ex, cache_ex)):
        err = rel_error(a, b)                  # float64 loops against im2col: rounding only
        print(f"{what}: relative error {err:.1e} {'ok' if err < 1e-9 else 'WRONG'}")
