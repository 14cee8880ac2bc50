"""The variants of the method, one per row of tables 5/6 of the paper (docs/design.md section 2).

Each k of ``W~ = k0*W + k1 + k2*M + k3*(W∘M)`` is, per variant, one of

- a fixed number (``0.0`` or ``1.0``): not a parameter, never stored;
- ``LEARNED``: a trained parameter, initialised so that W~ = W at step 0 (k0 -> 1, others -> 0);
- ``ONE_IF_BN`` (k0 of the simple/full models): fixed to 1 for a layer followed by batch norm, whose
  output ignores the weight scale, learned (from 1) otherwise.

Two baselines have no mask at all: ``classifier_only`` (the backbone is a frozen feature extractor,
only the new head is trained) and ``finetune`` (a full trainable copy of the network per domain).
"""
from __future__ import annotations

from dataclasses import dataclass

LEARNED = "learned"
ONE_IF_BN = "1 if BN follows, else learned"


@dataclass(frozen=True)
class Variant:
    """One way of extending the backbone to a new domain.

    kind: ``"mask"`` (masked affine transform), ``"classifier_only"`` or ``"finetune"``.
    ks: the spec of (k0, k1, k2, k3) for mask variants (numbers, LEARNED or ONE_IF_BN).
    domain_bn: the domain trains its own batch norm (else the pretrained BN is shared, in eval mode).
    surrogate: ``"identity"`` or ``"sigmoid"``; channelwise: one k per output channel.
    """

    name: str
    kind: str = "mask"
    ks: tuple = (0.0, 0.0, 0.0, 0.0)
    domain_bn: bool = True
    surrogate: str = "identity"
    channelwise: bool = False
    description: str = ""

    @property
    def has_mask(self) -> bool:
        return self.kind == "mask"

    def k_spec(self, j: int, followed_by_bn: bool):
        """``("fixed", value)`` or ``("learned", initial_value)`` for k_j of a layer."""
        spec = self.ks[j]
        if spec == ONE_IF_BN:
            return ("fixed", 1.0) if followed_by_bn else ("learned", 1.0)
        if spec == LEARNED:
            return ("learned", 1.0 if j == 0 else 0.0)
        return ("fixed", float(spec))


_L, _B = LEARNED, ONE_IF_BN
VARIANTS = {v.name: v for v in [
    Variant("piggyback", ks=(0.0, 0.0, 0.0, 1.0), domain_bn=False,
            description="Piggyback: W∘M, shared frozen BN (eval mode)"),
    Variant("piggyback_bn", ks=(0.0, 0.0, 0.0, 1.0), description="Piggyback with domain BN"),
    Variant("piggyback_bn_k1", ks=(0.0, _L, 0.0, 1.0), description="Piggyback with domain BN and k1"),
    Variant("simple_nobias", ks=(_B, 0.0, _L, 0.0), description="simple model without k1"),
    Variant("simple", ks=(_B, _L, _L, 0.0), description="the authors' ECCV-W model, eq. 2"),
    Variant("simple_sigmoid", ks=(_B, _L, _L, 0.0), surrogate="sigmoid",
            description="simple model, sigmoid surrogate"),
    Variant("full_nobias", ks=(_B, 0.0, _L, _L), description="full model without k1"),
    Variant("full_no_k2", ks=(_B, _L, 0.0, _L), description="full model without k2"),
    Variant("full", ks=(_B, _L, _L, _L), description="the paper's model, eq. 1"),
    Variant("full_sigmoid", ks=(_B, _L, _L, _L), surrogate="sigmoid",
            description="full model, sigmoid surrogate"),
    Variant("full_channelwise", ks=(_B, _L, _L, _L), channelwise=True,
            description="full model, one k per output channel"),
    Variant("classifier_only", kind="classifier_only", domain_bn=False,
            description="backbone as a frozen feature extractor, only the head is trained"),
    Variant("finetune", kind="finetune",
            description="every weight trained: a full copy of the network per domain"),
]}


def variant_names() -> list[str]:
    """Every known variant name, in the order of the paper's tables."""
    return list(VARIANTS)


def get_variant(name) -> Variant:
    """The :class:`Variant` called ``name`` (a Variant passes through); unknown names are a KeyError."""
    if isinstance(name, Variant):
        return name
    try:
        return VARIANTS[name]
    except (KeyError, TypeError):
        raise KeyError(f"unknown variant {name!r}; known variants: {', '.join(VARIANTS)}") from None
