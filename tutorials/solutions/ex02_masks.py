"""Solutions to the exercises of tutorial 2 (binary masks and surrogate gradients).

2.1 ``broken_surrogate_derivative``: a sigmoid surrogate with the wrong derivative (sigma instead of
    sigma * (1 - sigma)); ``run_repo_surrogate_test`` runs the repository's own test of the mask
    gradient with it patched in -- the test must fail (it does; tests/test_tutorial_exercises.py).
2.2 ``PIGGYBACK_AFFINE`` / ``add_variant``: a new row of the variant table -- Piggyback with a
    learned shift and scale of the mask (k1, k3 learned, k0 = k2 = 0).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

from npmask.masking import transform
from npmask.masking import variants
from npmask.masking.variants import LEARNED, Variant


def broken_surrogate_derivative(x, surrogate="identity"):
    """Like npmask's, but the sigmoid branch forgets the (1 - sigma) factor."""
    if surrogate == "sigmoid":
        return 1 / (1 + np.exp(-x))
    return np.ones_like(x)


def run_repo_surrogate_test(derivative, repo: Path) -> None:
    """Run tests/test_transform.py's dL/dR test with ``derivative`` patched into npmask's transform.

    Raises what the test raises (an AssertionError when it catches the broken derivative).
    """
    spec = importlib.util.spec_from_file_location("npmask_test_transform",
                                                  Path(repo) / "tests" / "test_transform.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(Path(repo) / "tests"))
    try:
        spec.loader.exec_module(module)
        original = transform.surrogate_derivative
        transform.surrogate_derivative = derivative   # what transform_backward calls
        try:
            module.test_R_gradient_is_surrogate_times_dL_dM()
        finally:
            transform.surrogate_derivative = original
    finally:
        sys.path.remove(str(Path(repo) / "tests"))


PIGGYBACK_AFFINE = Variant("piggyback_affine", ks=(0.0, LEARNED, 0.0, LEARNED),
                           description="Piggyback with a learned scale k3 and shift k1 of W∘M")


def add_variant(variant: Variant = PIGGYBACK_AFFINE) -> Variant:
    """Register ``variant`` in npmask's table, so add_domain(..., variant=name) finds it."""
    table = variants.VARIANTS
    if variant.name in table and table[variant.name] != variant:
        raise ValueError(f"another variant is already called {variant.name!r}")
    table[variant.name] = variant
    return variant
