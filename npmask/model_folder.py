"""A whole multi-domain model on disk: a folder with ``model.json`` and one file per domain.

    <folder>/model.json          format, base domain, head name, the domains in order, and the
                                 backbone: its fingerprint and where it was loaded from
    <folder>/domains/<name>.npz  one domain file each (npmask.storage: 1-bit masks, k's, BN, head,
                                 class names and normalisation)

The backbone's weights are not copied, only referred to (the shipped one by name, any other by
absolute path) and checked by fingerprint when loaded. A training run folder (``config.json`` and
``domains/``) is read the same way. :meth:`npmask.multidomain.MultiDomainModel.save` and ``load``
call the two functions here.
"""
from __future__ import annotations

import json
from pathlib import Path

from .io import atomic_write_text
from .nn.module import Module
from .pretrained import HERE, SHIPPED, BackboneError, load_backbone, pretraining_domain, shipped_path
from .storage import DomainFileError, load_domain, save_domain

MODEL_FORMAT = "npmask-model"
MODEL_VERSION = 1


def save_model(model, path) -> Path:
    """Write every added domain of ``model`` and a reference to its backbone into folder ``path``
    (``model.json`` last, every file atomically); returns the folder."""
    folder = Path(path)
    names = [d for d in model.domains if d != model.base_domain]
    for d in names:
        save_domain(model, d, folder / "domains" / f"{d}.npz")
    meta = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "base_domain": model.base_domain,
            "head_name": model.head_name, "domains": names,
            "backbone": {"fingerprint": model.fingerprint(), **(model.backbone_source or {})}}
    atomic_write_text(str(folder / "model.json"), json.dumps(meta, indent=2) + "\n")
    return folder


def load_model(cls, path, backbone=None, *, domains=None, dtype=None, backend: str = "numpy"):
    """A ``cls`` (MultiDomainModel) with the domains saved in folder ``path``; see its ``load``."""
    folder = Path(path)
    meta, names, source = _read_model_folder(folder)
    if backbone is None:
        backbone = source
    pretrained, source, info = _backbone(backbone, dtype=dtype, backend=backend)
    model = cls(pretrained, base_domain=meta.get("base_domain") or pretraining_domain(info))
    model.backbone_source = source
    want = meta.get("backbone", {}).get("fingerprint")
    if want and want != model.fingerprint():
        raise DomainFileError(f"{folder}: the model was saved with another backbone (fingerprint "
                              f"{want[:12]}..., the given one is {model.fingerprint()[:12]}...)")
    if domains is not None:
        unknown = [d for d in domains if d not in names]
        if unknown:
            raise DomainFileError(f"{folder}: no domain {unknown[0]!r}; it holds "
                                  f"{', '.join(names) or 'none'}")
        names = list(domains)
    for d in names:
        load_domain(model, folder / "domains" / f"{d}.npz", name=d)
    return model


def _read_model_folder(folder: Path):
    """(meta, domain names, backbone spec) of a saved model folder or a training run folder."""
    if (folder / "model.json").is_file():
        try:
            meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
        except ValueError as err:
            raise DomainFileError(f"{folder}/model.json is not valid JSON ({err})") from None
        if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
            raise DomainFileError(f"{folder}/model.json is not an npmask model description")
        if meta.get("version") != MODEL_VERSION:
            raise DomainFileError(f"{folder}/model.json: format version {meta.get('version')}, this "
                                  f"code reads {MODEL_VERSION}")
        bb = meta.get("backbone", {})
        spec = {k: bb[k] for k in ("path", "shipped") if k in bb} or None
        return meta, list(meta.get("domains", [])), spec
    if (folder / "config.json").is_file() and (folder / "domains").is_dir():
        try:
            cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except ValueError as err:
            raise DomainFileError(f"{folder}/config.json is not valid JSON ({err})") from None
        cfg = cfg.get("config", cfg) if isinstance(cfg, dict) else {}
        names = sorted(p.stem for p in (folder / "domains").glob("*.npz"))
        spec = {"path": cfg["backbone"]} if cfg.get("backbone") else {"shipped": None}
        if not names:
            raise DomainFileError(f"{folder}: the run has not finished any domain yet (domains/ is "
                                  "empty)")
        return {}, names, spec
    if not folder.exists():
        raise DomainFileError(f"{folder}: no such folder")
    raise DomainFileError(f"{folder}: neither a saved model (model.json) nor a training run folder "
                          "(config.json and domains/)")


def _backbone(spec, *, dtype=None, backend="numpy"):
    """(pretrained Module, source record, backbone info) for a Module, a backbone path or a
    recorded source."""
    if isinstance(spec, Module):
        return spec, None, {}
    if spec is None:
        raise DomainFileError("the saved model records no backbone location; pass backbone=")
    if isinstance(spec, dict):
        if "path" in spec:
            spec = spec["path"]
        else:
            spec = shipped_path(spec.get("shipped") or SHIPPED)
    try:
        net, info = load_backbone(spec, dtype=dtype, backend=backend)
    except BackboneError as err:
        raise DomainFileError(str(err)) from None
    return net, backbone_source(spec), info


def backbone_source(path) -> dict:
    """How :meth:`MultiDomainModel.save` records a backbone file: the shipped one by name (it
    moves with the installation), any other by absolute path."""
    p = Path(path).resolve()
    if p.parent == HERE:
        return {"shipped": p.stem}
    return {"path": str(p)}
