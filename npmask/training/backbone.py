"""The pretrained backbone of a training run, loaded and checked against the run's settings.

Used by the training itself and, before any run folder exists, by the checks of
:mod:`npmask.training.validate`.
"""
from __future__ import annotations

from ..model_folder import backbone_source
from ..multidomain import MultiDomainModel
from ..pretrained import BackboneError, load_backbone, pretraining_domain
from .errors import ConfigError


def load_run_backbone(cfg):
    """The pretrained backbone of a run as a MultiDomainModel (checked against cfg.model)."""
    try:
        backbone, info = load_backbone(cfg.backbone, dtype=cfg.dtype, backend=cfg.backend)
    except BackboneError as err:
        raise ConfigError(str(err)) from None
    if info["model"] != cfg.model:
        raise ConfigError(f"backbone {cfg.backbone} is a {info['model']}, but the run asks for "
                          f"--model {cfg.model}; pretrain one with python -m npmask.pretrain "
                          f"--model {cfg.model} and pass it with --backbone")
    if int(info["input_size"]) != int(cfg.input_size):
        raise ConfigError(f"backbone {cfg.backbone} was trained on {info['input_size']}px inputs, "
                          f"the run uses {cfg.input_size}px")
    model = MultiDomainModel(backbone, base_domain=pretraining_domain(info))
    model.backbone_source = backbone_source(cfg.backbone) if cfg.backbone else {"shipped": None}
    return model, info
