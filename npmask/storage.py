"""One ``.npz`` file per domain: exactly what a domain adds to the shared backbone (Ω_i).

File layout (every entry a plain array; loaded with ``allow_pickle=False``)::

    __meta__           JSON text: format, domain, variant, num_classes, tau, backbone fingerprint,
                       N_p (backbone parameters), head name, dtype, mask shapes, and (optional,
                       files written before it existed lack it) ``data``: what inference needs --
                       class names, mean/std, image and input size, channels, the mirroring flag
                       (npmask.inference; MultiDomainModel.set_data_info)
    mask/<layer>       uint8, the binary mask M = 1[R >= tau] bit-packed (np.packbits): 1 bit per weight
    param/<name>       learned k's, domain batch norm (weight, bias, running_mean, running_var), and
                       for ``finetune`` every weight of the domain's copy
    head/<name>        the classifier (not counted in the parameter overhead, as in the paper)
    real/<name>        only with ``include_real_masks=True`` (training checkpoints): R itself, so that
                       training can resume exactly; inference needs only the bits

Loading checks the backbone fingerprint (sha256 of the backbone's arrays) and every shape, and gives
logits identical to the saved model's: the forward pass reads only M, never R.
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from .backend import get_array_module, to_numpy
from .masking.layers import DEFAULT_MASK_INIT
from .masking.variants import get_variant
from .models import get_submodule
from .io import current_umask, fsync_dir, open_npz

FORMAT = "npmask-domain"
VERSION = 1


class DomainFileError(ValueError):
    """A domain file that cannot be loaded into this model (other backbone, shapes, or malformed)."""


class DomainExistsError(ValueError):
    """The model has a domain of that name already (``name``); load with another name or replace."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name


def _categorise(key: str, head_name: str) -> str:
    if key == head_name or key.startswith(head_name + "."):
        return "head"
    if key.endswith(".mask_real") or key == "mask_real":
        return "mask"
    return "param"


def save_domain(model, name: str, path, include_real_masks: bool = False) -> str:
    """Write domain ``name`` of ``model`` (a MultiDomainModel) to ``path`` atomically; returns the path.

    ``include_real_masks``: also store the real-valued masks R (32 bits per weight) so that training can
    resume from the file; leave it False for the 1-bit-per-weight deployment file.
    """
    if name == model.base_domain:
        raise ValueError(f"{name!r} is the pretraining domain: it is the backbone itself, nothing to save")
    net = model.network(name)
    variant = model.variant(name)
    settings = model.settings[name]
    head_name = model.head_name
    arrays, mask_shapes = {}, {}
    dtype = None
    for key, value in net.state_dict().items():
        a = to_numpy(value)
        cat = _categorise(key, head_name)
        if cat == "mask":
            layer = key[: -len(".mask_real")]
            tau = net_layer_tau(net, layer)
            arrays[f"mask/{layer}"] = np.packbits((a >= tau).reshape(-1))
            mask_shapes[layer] = list(a.shape)
            if include_real_masks:
                arrays[f"real/{key}"] = a
            dtype = a.dtype.str
        else:
            arrays[f"{cat}/{key}"] = a
            if a.dtype.kind == "f":
                dtype = dtype or a.dtype.str
    meta = {
        "format": FORMAT, "version": VERSION, "domain": name, "variant": variant.name,
        "num_classes": settings["num_classes"], "tau": settings["tau"],
        "mask_init": settings.get("mask_init", list(DEFAULT_MASK_INIT)),
        "backbone_fingerprint": model.fingerprint(),
        "backbone_parameters": model.backbone_num_parameters(),
        "head_name": head_name, "dtype": dtype, "mask_shapes": mask_shapes,
    }
    info = getattr(model, "data_info", {}).get(name)
    if info is not None:
        meta["data"] = info
    arrays["__meta__"] = np.array(json.dumps(meta))
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes the file private; give it normal rights
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one, never half of one
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(folder)  # the rename itself reaches the disk
    return path


def net_layer_tau(net, layer_path: str) -> float:
    """The threshold tau of the masked layer at ``layer_path``."""
    return float(getattr(get_submodule(net, layer_path), "tau", 0.0))


def read_domain_file(path) -> tuple[dict, dict]:
    """``(meta, arrays)`` of a domain file, checked for the format; arrays as NumPy."""
    path = os.fspath(path)
    try:
        with open_npz(path) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except Exception as err:
        raise DomainFileError(f"{path}: not a readable .npz domain file ({type(err).__name__}: {err})") from None
    if "__meta__" not in arrays:
        raise DomainFileError(f"{path}: no __meta__ entry; not an npmask domain file")
    try:
        meta = json.loads(str(arrays.pop("__meta__")))
    except ValueError as err:
        raise DomainFileError(f"{path}: __meta__ is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise DomainFileError(f"{path}: __meta__ must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise DomainFileError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise DomainFileError(f"{path}: format version {meta.get('version')}, this code reads {VERSION}")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise DomainFileError(f"{path}: __meta__ lacks {missing}; the file is incomplete or corrupt")
    _check_meta_types(meta, path)
    head = arrays.get(f"head/{meta['head_name']}.weight")
    if head is not None and (head.ndim != 2 or head.shape[0] != meta["num_classes"]):
        raise DomainFileError(f"{path}: __meta__ field 'num_classes' is {meta['num_classes']} but "
                              f"the stored classifier has shape {tuple(head.shape)}")
    return meta, arrays


def _check_meta_types(meta: dict, path) -> None:
    """Each __meta__ field has the type load_domain relies on (DomainFileError naming it)."""
    def num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)

    checks = {
        "domain": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
        "variant": (lambda v: isinstance(v, str), "a string"),
        "num_classes": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                        "an integer >= 1"),
        "tau": (num, "a finite number"),
        "mask_init": (lambda v: isinstance(v, list) and len(v) == 2 and all(num(x) for x in v)
                      and 0 < v[0] < v[1], "[LO, HI] with 0 < LO < HI"),
        "backbone_fingerprint": (lambda v: isinstance(v, str), "a string"),
        "backbone_parameters": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                                "an integer > 0"),
        "head_name": (lambda v: isinstance(v, str), "a string"),
        "mask_shapes": (lambda v: isinstance(v, dict) and all(
            isinstance(s, list) and all(isinstance(n, int) and n >= 0 for n in s)
            for s in v.values()), "an object mapping layers to shapes"),
    }
    for key, (ok, want) in checks.items():
        if not ok(meta[key]):
            raise DomainFileError(f"{path}: __meta__ field {key!r} must be {want}, got "
                                  f"{json.dumps(meta[key])[:60]}")


# What load_domain and the overhead accounting read from __meta__.
_META_KEYS = ("domain", "variant", "num_classes", "tau", "mask_init", "backbone_fingerprint",
              "backbone_parameters", "head_name", "mask_shapes")


def load_domain(model, path, name: str | None = None, replace: bool = False) -> str:
    """Add the domain stored in ``path`` to ``model`` (a MultiDomainModel); returns its name.

    ``name`` overrides the stored domain name. The backbone must be the one the file was trained on
    (same fingerprint) and every stored array must match the network's shapes, else DomainFileError.
    Without ``real/`` entries R is rebuilt from the bits as tau ± low (``mask_init``), which gives
    the same M and therefore the same logits.
    """
    meta, arrays = read_domain_file(path)
    name = name or meta["domain"]
    fp = model.fingerprint()
    if meta["backbone_fingerprint"] != fp:
        raise DomainFileError(
            f"{path}: domain {meta['domain']!r} was trained on another backbone (fingerprint "
            f"{meta['backbone_fingerprint'][:12]}..., this model's backbone is {fp[:12]}...); load it "
            "into a model built from the same pretrained weights")
    try:
        get_variant(meta["variant"])
    except KeyError as err:
        raise DomainFileError(f"{path}: {err.args[0]}") from None
    if name in model.networks:
        if not replace:
            raise DomainExistsError(f"domain {name!r} already exists in the model; pass replace=True "
                                    "to overwrite", name)
        if name == model.base_domain:
            raise ValueError("the pretraining domain cannot be replaced")
    # the old domain (if any) is put back when the file turns out not to fit: a failed load changes nothing
    old = ((model.networks.pop(name), model.variants.pop(name), model.settings.pop(name))
           if name in model.networks else None)
    old_info = model.data_info.pop(name, None)
    try:
        model.add_domain(name, meta["num_classes"], meta["variant"], seed=0, tau=meta["tau"],
                         mask_init=meta["mask_init"])
        _fill(model, name, meta, arrays, path)
        if meta.get("data") is not None:
            try:
                model.set_data_info(name, **meta["data"])
            except (ValueError, TypeError) as err:
                raise DomainFileError(f"{path}: __meta__ 'data' is malformed ({err})") from None
    except Exception:
        for store in (model.networks, model.variants, model.settings, model.data_info):
            store.pop(name, None)
        if old is not None:
            model.networks[name], model.variants[name], model.settings[name] = old
        if old_info is not None:
            model.data_info[name] = old_info
        raise
    return name


def _fill(model, name, meta, arrays, path) -> None:
    net = model.network(name)
    head_name = model.head_name
    low = float(meta["mask_init"][0])
    tau = float(meta["tau"])
    used = set()
    for key, dst in net.state_dict().items():
        cat = _categorise(key, head_name)
        if cat == "mask":
            layer = key[: -len(".mask_real")]
            real_key = f"real/{key}"
            if real_key in arrays:
                src = arrays[real_key]
                used.add(real_key)
                _check_shape(src.shape, dst.shape, real_key, path)
                _check_values(src, real_key, path)
            else:
                entry = f"mask/{layer}"
                if entry not in arrays:
                    raise DomainFileError(f"{path}: no entry {entry!r} for masked layer {layer!r}")
                shape = tuple(meta["mask_shapes"].get(layer, ()))
                _check_shape(shape, dst.shape, entry, path)
                packed, n = arrays[entry], int(np.prod(dst.shape))
                # unpackbits would silently pad a short array with zeros: check the size first
                if packed.dtype != np.uint8 or packed.shape != ((n + 7) // 8,):
                    raise DomainFileError(f"{path}: entry {entry!r} must be {(n + 7) // 8} packed uint8 "
                                          f"bytes for {n} mask bits, got {packed.dtype} {packed.shape}")
                bits = np.unpackbits(packed, count=n).reshape(dst.shape)
                src = np.where(bits.astype(bool), tau + low, tau - low)
            used.add(f"mask/{layer}")
        else:
            entry = f"{cat}/{key}"
            if entry not in arrays:
                raise DomainFileError(f"{path}: no entry {entry!r}; the file does not fit this network "
                                      f"(variant {meta['variant']!r})")
            src = arrays[entry]
            used.add(entry)
            _check_shape(src.shape, dst.shape, entry, path)
            _check_values(src, entry, path)
        xp = get_array_module(dst)
        dst[...] = xp.asarray(src, dtype=dst.dtype)
    extra = sorted(set(arrays) - used)
    if extra:
        raise DomainFileError(f"{path}: entries {extra[:5]} do not belong to this network")


def _check_values(src, entry, path) -> None:
    """Learned numbers must be finite (a NaN k or BN weight makes every logit NaN), and a batch
    norm's running variance >= 0 (its square root is taken)."""
    if src.dtype.kind not in "fc":
        if src.dtype.kind not in "iub":
            raise DomainFileError(f"{path}: entry {entry!r} has dtype {src.dtype}, not a number")
        return
    if not np.all(np.isfinite(src)):
        raise DomainFileError(f"{path}: entry {entry!r} holds NaN or infinite values; the file is "
                              "damaged (or the run diverged before it was saved)")
    if entry.endswith("running_var") and np.any(src < 0):
        raise DomainFileError(f"{path}: entry {entry!r} holds negative variances "
                              f"(min {float(src.min()):g}); the file is damaged")


def _check_shape(got, want, entry, path) -> None:
    if tuple(got) != tuple(want):
        raise DomainFileError(f"{path}: entry {entry!r} has shape {tuple(got)}, the network expects "
                              f"{tuple(want)}")
