"""npmask: binary-mask multi-domain learning in NumPy/CuPy with hand-written backprop.

The method (Mancini et al., "Boosting Binary Masks for Multi-Domain Learning through Affine
Transformations"): a pretrained network is extended to new visual domains without changing its
weights. Per domain, every convolution and hidden fully connected weight W is replaced by

    W~ = k0*W + k1 + k2*M + k3*W∘M          M = 1[R >= tau], a learned binary mask (1 bit per weight)

with a few learned scalars k; the real-valued R learns through a straight-through gradient, and
only M (packed), the k's, the domain's batch norm and its classifier are stored. Piggyback and the
"simple" model are special cases (the variants). There is no autodiff: every layer has a
hand-written backward pass, checked against finite differences. Formulas, variants and protocols:
docs/design.md.

The map of the package:

- ``nn/``: layers with forward and backward passes (convolution: the readable im2col path in
  ``conv.py``, the naive loops in ``conv_reference.py``, the fast path in ``conv_fast.py`` and
  ``conv_columns.py``; batch norm (``bn_relu.py``: the blocks' step relu(bn(x) [+ residual]),
  fused or not), linear, pooling, the Wide-ResNet block; ``parallel.py``, the CPU threads; on
  CuPy, fused kernels for batch norm + ReLU in ``batchnorm_cuda.py`` and for im2col / col2im in
  ``conv_cuda.py``);
- ``masking/``: the mask transform (eq. 1), the masked layers and the variants;
- ``models/``, ``pretrained/``: the backbones (WRN, VGG, torchvision's ResNet and DenseNet, the
  residual-adapters ResNet-26) and the shipped pretrained one;
- ``multidomain.py``, ``model_folder.py``, ``inference.py``: one frozen backbone with a set of
  per-domain parameters for each domain, saved as a folder, predicting on image files;
- ``optim/``, ``metrics.py``, ``storage.py``, ``gradcheck.py``: optimisers and schedulers, the
  Decathlon score and parameter cost, domain files, gradient checks;
- ``data/``, ``training/``: the domain format, the batch iterator, the synthetic benchmark, and
  the machinery behind the commands ``train``, ``pretrain``, ``compare`` (local or on Ray),
  ``convert`` and ``export`` (PyTorch weights in and out) and ``predict``, the training step
  replayed from CUDA graphs (``training/graph_step.py``, ``--cuda-graphs``) and the domains
  trained side by side in processes (``training/domain_workers.py``, ``--workers``);
- ``backend.py``: NumPy or CuPy; ``io.py``: atomic file writes; ``config.py``: the run-time
  settings (threads, convolution chunking and layouts), changed with ``npmask.config.using(...)``,
  the thread count also by ``NPMASK_THREADS``.
"""
__version__ = "0.1.0"
