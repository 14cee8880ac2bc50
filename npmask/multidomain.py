"""One shared, frozen backbone; per domain a small set of parameters Ω_i (section 3.1 of the paper).

    model = MultiDomainModel(pretrained)                  # the pretraining domain is "base"
    model.add_domain("svhn", num_classes=10, variant="full", seed=0)
    model.set_domain("svhn"); model.train()
    logits = model.forward(x); model.backward(dlogits)    # gradients land in the domain's params
    groups = model.parameter_groups()                     # {"body": [...], "head": [...]}
    opt = Optimizers(body=Adam(groups["body"], 1e-4), head=SGD(groups["head"], 1e-3, momentum=0.9))

    model.set_data_info("svhn", domain)                   # class names, mean/std, sizes (for predict)
    model.predict(["cat.png"], domain="svhn").top(3)      # image files or uint8 HWC -> (name, prob)
    model.save("my_model"); MultiDomainModel.load("my_model")   # every domain + backbone reference

A domain network has the pretrained network's structure with

- every Conv2d and hidden Linear replaced by a :class:`MaskedConv2d` / :class:`MaskedLinear` that
  reads the backbone's weight by reference (mask variants), or by a :class:`SharedFrozen` wrapper
  (``classifier_only``), or by a trainable copy (``finetune``);
- every batch norm replaced by a trainable copy initialised from the pretrained one (domain BN), or
  shared frozen in eval mode (``piggyback`` and ``classifier_only``);
- its own classifier head (a fresh Linear sized for the domain's classes).

The backbone's arrays are never written: it is frozen and kept in eval mode, and the pretraining
domain (``base_domain``) is the pretrained network itself, head included.
"""
from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import numpy as np

from .backend import backend_name, get_array_module, to_device, to_numpy
from .inference import Predictions, check_data_info, data_info, prepare_images, softmax
from .masking.layers import DEFAULT_MASK_INIT, MaskedConv2d, MaskedLinear, SharedFrozen
from .masking.variants import Variant, get_variant
from .models import get_submodule, set_submodule
from .nn.batchnorm import BatchNorm
from .nn.checks import check_array
from .nn.conv import Conv2d
from .nn.linear import Linear
from .nn.module import Module
from .model_folder import load_model, save_model


class MultiDomainModel:
    """A pretrained backbone shared by any number of domains, one of which is active at a time.

    ``pretrained``: a model with ``head_name`` (e.g. from :func:`npmask.models.create`), trained on
    the pretraining domain. It is frozen and put in eval mode here and never modified afterwards.
    """

    def __init__(self, pretrained: Module, base_domain: str = "base"):
        if not hasattr(pretrained, "head_name"):
            raise ValueError("the pretrained model needs a `head_name` attribute (dotted path of its classifier)")
        self.backbone = pretrained.freeze().eval()
        self.head_name = pretrained.head_name
        self.base_domain = base_domain
        self.networks: dict[str, Module] = {base_domain: pretrained}
        self.variants: dict[str, Variant | None] = {base_domain: None}
        self.settings: dict[str, dict] = {base_domain: {}}
        self.active = base_domain
        self._fingerprint = None
        # per domain: what inference needs (class names, mean/std, sizes; npmask.inference)
        self.data_info: dict[str, dict] = {}
        # where the backbone was loaded from ({"path": ...} or {"shipped": name}); save() records it
        self.backbone_source: dict | None = None

    # ------------------------------------------------------------------ domains
    @property
    def domains(self) -> list[str]:
        return list(self.networks)

    def add_domain(self, name: str, num_classes: int, variant="full", seed=0, *, tau: float = 0.0,
                   mask_init=DEFAULT_MASK_INIT) -> Module:
        """Create domain ``name`` with ``num_classes`` outputs and the given variant; returns its network.

        ``seed`` draws the real masks R ~ U(mask_init) and the new head. The new domain is not made
        active (call :meth:`set_domain`).
        """
        if name in self.networks:
            raise ValueError(f"domain {name!r} already exists; domains: {self.domains}")
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        variant = get_variant(variant)
        net = build_domain_network(self.backbone, variant, int(num_classes), seed, tau=tau,
                                   mask_init=mask_init)
        self.networks[name] = net
        self.variants[name] = variant
        self.settings[name] = {"num_classes": int(num_classes), "seed": seed, "tau": float(tau),
                               "mask_init": [float(v) for v in mask_init]}
        return net

    def set_data_info(self, name: str, domain=None, *, input_size=None, **fields) -> "MultiDomainModel":
        """Record what inference on domain ``name`` needs; it is saved in the domain's file.

        ``domain``: a loaded :class:`npmask.data.format.Domain` (class names, mean/std, image size,
        mirroring come from it; ``input_size`` is the network input when the test view crops the
        images). Or give the fields of :data:`npmask.inference.DATA_KEYS` by keyword.
        """
        self._check(name)
        if domain is not None:
            info = data_info(domain, input_size)
        else:
            info = {} if input_size is None else {"input_size": input_size}
        info.update(fields)
        num_classes = self.settings[name].get("num_classes") if name != self.base_domain else None
        self.data_info[name] = check_data_info(info, num_classes)
        return self

    def set_domain(self, name: str) -> "MultiDomainModel":
        self._check(name)
        self.active = name
        return self

    def network(self, name: str | None = None) -> Module:
        """The network of domain ``name`` (default: the active one)."""
        return self.networks[self._check(name)]

    def variant(self, name: str | None = None) -> Variant | None:
        """The variant of domain ``name`` (None for the pretraining domain)."""
        return self.variants[self._check(name)]

    def head(self, name: str | None = None) -> Module:
        """The classifier of domain ``name``."""
        return get_submodule(self.network(name), self.head_name)

    def _check(self, name):
        name = self.active if name is None else name
        if name not in self.networks:
            raise KeyError(f"unknown domain {name!r}; domains: {self.domains}")
        return name

    # ------------------------------------------------------------------ computation
    def forward(self, x, domain: str | None = None):
        """Logits (N, num_classes of the domain) for images x (N, C, H, W) of ``domain`` (default: active)."""
        check_array(self, x, "input", (None, None, None, None))
        return self.network(domain).forward(x)

    __call__ = forward

    def backward(self, dlogits):
        """Backpropagate through the active domain's last forward; accumulates its gradients.

        Returns dL/dx, or None for ``classifier_only``, whose backpropagation stops at the head
        (nothing below it is trained). The pretraining domain cannot be trained.
        """
        if self.active == self.base_domain:
            raise RuntimeError(f"the pretraining domain {self.base_domain!r} is frozen; set_domain() "
                               "to a domain added with add_domain() before training")
        variant = self.variants[self.active]
        if variant.kind == "classifier_only":
            self.head().backward(dlogits)
            return None
        return self.network().backward(dlogits)

    def predict(self, images, domain: str | None = None, batch_size: int = 256):
        """Class names and probabilities of ``domain`` (default: the active one) for ``images``.

        images: image file paths, or uint8 pixels (H, W, C) / (N, H, W, C) / a list of them. They
        are resized and normalised as the domain's test data were (:mod:`npmask.inference`), using
        the description stored with the domain (:meth:`set_data_info`, or its domain file).
        Returns :class:`npmask.inference.Predictions` (``.labels``, ``.probabilities``, ``.top(k)``).

        A float array (N, C, h, w) is taken as the network input, already normalised, and its
        logits are returned, as :meth:`predict_logits` does.
        """
        if _is_network_input(images):
            return self.predict_logits(images, domain, batch_size)
        name = self._check(domain)
        info = self.data_info.get(name)
        if info is None:
            raise ValueError(f"domain {name!r} has no class names and normalisation (its domain "
                             "file predates them, or it was added by hand): call "
                             f"model.set_data_info({name!r}, <the loaded data domain>), or train it "
                             "again with npmask.train, whose domain files carry them")
        head_w = self.head(name).params["weight"]
        x = prepare_images(images, info, dtype=head_w.dtype)
        x = to_device(x, backend_name(head_w))
        probs = softmax(to_numpy(self.predict_logits(x, name, batch_size)))
        sources = None
        if isinstance(images, (list, tuple)):
            sources = [str(i) if isinstance(i, (str, os.PathLike)) else None for i in images]
        elif isinstance(images, (str, os.PathLike)):
            sources = [str(images)]
        return Predictions(list(info["class_names"]), probs, sources)

    def predict_logits(self, x, domain: str | None = None, batch_size: int = 256):
        """Logits of ``domain`` in eval mode, batch by batch; the training mode is restored after."""
        net = self.network(domain)
        was_training = net.training
        net.eval()
        try:
            outs = [net.forward(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        finally:
            if was_training and (domain or self.active) != self.base_domain:
                net.train()
        xp = get_array_module(outs[0])
        return xp.concatenate(outs, axis=0)

    @property
    def training(self) -> bool:
        """Whether the active domain's network is in training mode (as ``Module.training``)."""
        return self.network().training

    def train(self, mode: bool = True) -> "MultiDomainModel":
        """Training mode for the active domain (batch statistics in its own BN, if any)."""
        if mode and self.active == self.base_domain:
            raise RuntimeError(f"the pretraining domain {self.base_domain!r} is frozen and stays in eval mode")
        self.network().train(mode)
        return self

    def eval(self) -> "MultiDomainModel":
        self.network().eval()
        return self

    def zero_grad(self) -> None:
        self.network().zero_grad()

    def parameter_groups(self, name: str | None = None) -> dict:
        """The trainable parameters of a domain as ParamRefs: ``{"body": [...], "head": [...]}``.

        body: real masks, learned k's and domain BN (the paper trains them with Adam, lr 1e-4), or every
        backbone-copy weight for ``finetune``, or nothing for ``classifier_only``; head: the classifier
        (SGD with momentum 0.9, lr 1e-3).
        """
        net = self.network(name)
        return {"body": net.parameter_refs(trainable_only=True, exclude=(self.head_name,)),
                "head": net.parameter_refs(trainable_only=True, include=(self.head_name,))}

    def parameters(self, name: str | None = None) -> list:
        """Every parameter of domain ``name``'s network (default: the active one), as PyTorch's
        ``parameters()``: the frozen shared backbone weights too (their ``grad`` is None, so an
        optimiser skips them). ``SGD(model.parameters(), lr=...)`` trains the whole domain with one
        rule; :meth:`parameter_groups` splits it as the paper does."""
        return self.network(name).parameters()

    def named_parameters(self, name: str | None = None) -> list:
        """``[(dotted_name, array), ...]`` of domain ``name``'s network (see :meth:`parameters`)."""
        return self.network(name).named_parameters()

    def to(self, backend: str) -> "MultiDomainModel":
        """Move the backbone and every domain to ``backend``. Create optimisers afterwards."""
        self.backbone.to(backend)
        for name, net in self.networks.items():
            if net is not self.backbone:
                net.to(backend)
        return self

    def export_dense(self, name: str | None = None) -> dict:
        """Domain ``name``'s network as a plain dense state_dict in the backbone's layout (NumPy arrays).

        Every masked conv/linear weight becomes W~ = k0 W + k1 + k2 M + k3 W∘M with the domain's
        mask and k's (its bias is the backbone's); batch norm is the domain's own (parameters and
        running statistics) when the variant has domain BN, else the backbone's; the head is the
        domain's classifier. A model of the backbone's architecture built for the domain's classes
        loads the result with ``load_state_dict`` and computes the domain's logits (eval mode).
        The names are the backbone's (PyTorch's, for the torchvision layouts).
        """
        net = self.network(name)
        out = {}
        for key in self.backbone.state_dict():
            path, _, leaf = key.rpartition(".")
            module = get_submodule(net, path)
            if isinstance(module, (MaskedConv2d, MaskedLinear)):
                value = module.transformed_weight() if leaf == "weight" else module.source.params[leaf]
            elif isinstance(module, SharedFrozen):
                src = module.source
                value = src.params[leaf] if leaf in src.params else src.buffers[leaf]
            else:
                value = module.params[leaf] if leaf in module.params else module.buffers[leaf]
            out[key] = np.array(to_numpy(value), copy=True)
        return out

    # ------------------------------------------------------------------ saving the whole model
    def save(self, path) -> Path:
        """Write every added domain and a reference to the backbone into folder ``path``.

        Layout (the same as a training run folder's ``domains/``, so :meth:`load` reads both)::

            <path>/model.json          format, base domain, head name, the domains in order, and the
                                       backbone: its fingerprint and where it was loaded from
            <path>/domains/<name>.npz  one domain file each (npmask.storage: 1-bit masks, k's, BN,
                                       head, class names and normalisation)

        The backbone's weights are not copied: :meth:`load` takes them from the recorded location
        (or from ``backbone=``) and checks the fingerprint. Every file is written atomically,
        ``model.json`` last. Returns the folder.
        """
        return save_model(self, path)

    @classmethod
    def load(cls, path, backbone=None, *, domains=None, dtype=None,
             backend: str = "numpy") -> "MultiDomainModel":
        """The model saved by :meth:`save` in folder ``path``, or the trained domains of a run folder.

        backbone: the pretrained network (a Module), a backbone ``.npz`` path, or None for the one
        recorded in ``model.json`` (a run folder: its ``config.json``; the shipped backbone when it
        names none). Its fingerprint must match. domains: the names to load (default: all).
        Raises :class:`npmask.storage.DomainFileError` (a ValueError) with one clear line when the
        folder holds no model or does not fit the backbone.
        """
        return load_model(cls, path, backbone, domains=domains, dtype=dtype, backend=backend)

    # ------------------------------------------------------------------ accounting
    def backbone_arrays(self) -> list[tuple[str, object]]:
        """(name, array) of every backbone parameter and buffer, classifier excluded, in a stable order."""
        return [(k, v) for k, v in self.backbone.state_dict().items()
                if not (k == self.head_name or k.startswith(self.head_name + "."))]

    def backbone_num_parameters(self) -> int:
        """N_p: scalar parameters of the backbone, classifier and buffers excluded."""
        return int(sum(p.size for n, p in self.backbone.named_parameters()
                       if not n.startswith(self.head_name + ".")))

    def fingerprint(self) -> str:
        """sha256 over the backbone's names, shapes, dtypes and bytes (classifier excluded); cached."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_arrays(self.backbone_arrays())
        return self._fingerprint

    def __repr__(self) -> str:
        rows = [f"  {n}: {'pretrained' if v is None else v.name}" for n, v in self.variants.items()]
        return f"MultiDomainModel(head={self.head_name!r}, active={self.active!r}\n" + "\n".join(rows) + "\n)"


def _is_network_input(x) -> bool:
    """A float array (N, C, h, w), NumPy or CuPy: already the network's input."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and getattr(dtype, "kind", "") == "f" and getattr(x, "ndim", 0) == 4


def fingerprint_arrays(named_arrays) -> str:
    """sha256 hex digest of ``[(name, array), ...]``: names, shapes, dtypes and raw bytes."""
    h = hashlib.sha256()
    for name, a in named_arrays:
        a = np.ascontiguousarray(to_numpy(a))
        h.update(f"{name}|{a.shape}|{a.dtype.str}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _array_memo(model: Module) -> dict:
    """``{id(array): array}`` for every array a module of ``model`` holds (params, buffers, caches).

    Passed to ``copy.deepcopy`` it makes the copy *share* those arrays instead of duplicating them:
    we copy the network's structure, then replace every module that holds parameters.
    """
    memo = {}

    def visit(v, depth=0):
        if hasattr(v, "__array_interface__") or type(v).__module__.startswith("cupy"):
            memo[id(v)] = v
        elif isinstance(v, (list, tuple)) and depth < 3:
            for item in v:
                visit(item, depth + 1)
        elif isinstance(v, dict) and depth < 3:
            for item in v.values():
                visit(item, depth + 1)

    for m in model.modules():
        for v in vars(m).values():
            visit(v)
    return memo


def build_domain_network(pretrained: Module, variant, num_classes: int, seed=0, *, tau: float = 0.0,
                         mask_init=DEFAULT_MASK_INIT) -> Module:
    """A network for a new domain, built on ``pretrained`` (which is not modified).

    See the module docstring for what each variant does to convs, linears and batch norms.
    """
    variant = get_variant(variant)
    head_name = pretrained.head_name
    old_head = get_submodule(pretrained, head_name)
    if not isinstance(old_head, Linear):
        raise ValueError(f"the head {head_name!r} must be a Linear, got {type(old_head).__name__}")
    rng = np.random.default_rng(seed)
    dtype = old_head.params["weight"].dtype
    xp = get_array_module(old_head.params["weight"])

    if variant.kind == "finetune":
        net = copy.deepcopy(pretrained)                       # every array copied: its own weights
        net.unfreeze()
    else:
        net = copy.deepcopy(pretrained, _array_memo(pretrained))   # structure only, arrays shared
        for path, src in list(pretrained.named_modules()):
            if not path or path == head_name or not src.params:
                continue
            if isinstance(src, (Conv2d, Linear)):
                if variant.has_mask:
                    cls = MaskedConv2d if isinstance(src, Conv2d) else MaskedLinear
                    new = cls(src, variant, tau=tau, mask_init=mask_init, rng=rng)
                else:
                    new = SharedFrozen(src)
            elif isinstance(src, BatchNorm):
                if variant.domain_bn:
                    new = copy.deepcopy(src)                  # its own arrays, initialised from src
                    new.unfreeze()
                else:
                    new = SharedFrozen(src)
            else:
                raise TypeError(f"don't know how to extend {type(src).__name__} at {path!r} to a new "
                                "domain (supported: Conv2d, Linear, batch norm)")
            set_submodule(net, path, new)
    head = Linear(old_head.in_features, num_classes, bias=True, dtype=dtype, rng=rng)
    if xp is not np:
        head.to("cupy")
    head.followed_by_bn = False
    set_submodule(net, head_name, head)
    return net.train()
