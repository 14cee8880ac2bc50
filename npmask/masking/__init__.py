"""The method: binary masks with an affine transform of the pretrained weights (eq. 1 of the paper).

- :mod:`.transform`: the functional transform W~ = k0*W + k1 + k2*M + k3*(W∘M) and its backward;
- :mod:`.variants`: the rows of the paper's ablation tables, selectable by name;
- :mod:`.layers`: MaskedConv2d / MaskedLinear built on a frozen pretrained layer;
- :mod:`.inspect`: mask densities and k values per layer, and the plots of figures 3/4;
- :mod:`.cuda`: the transform as fused CUDA kernels (CuPy arrays); :mod:`.common`: what it shares
  with :mod:`.transform` (the fixed/learned test of a k, the forward pass's cache).
"""
from .transform import (SURROGATES, apply_affine, surrogate_derivative, transform_backward,
                        transform_backward_reference, transform_forward, transform_forward_reference)
from .variants import LEARNED, ONE_IF_BN, VARIANTS, Variant, get_variant, variant_names
from .layers import MaskedConv2d, MaskedLinear, SharedFrozen

__all__ = [
    "SURROGATES", "apply_affine", "surrogate_derivative", "transform_forward", "transform_backward",
    "transform_forward_reference", "transform_backward_reference",
    "LEARNED", "ONE_IF_BN", "VARIANTS", "Variant", "get_variant", "variant_names",
    "MaskedConv2d", "MaskedLinear", "SharedFrozen",
]
