"""Solutions to the exercises of tutorial 4 (reading the masks).

4.1 ``densities_from_file``: the fraction of ones of every mask, read from a stored domain file
    alone (the bit-packed ``mask/<layer>`` entries), without building any network.
4.2 ``most_changed_layer``: the masked layer whose mask keeps the fewest weights, and its density.
"""
from __future__ import annotations

import numpy as np

from npmask.storage import read_domain_file


def densities_from_file(path) -> dict:
    """``{layer: fraction of ones in its mask}`` of a domain file, in the file's layer order."""
    meta, arrays = read_domain_file(path)
    out = {}
    for layer, shape in meta["mask_shapes"].items():
        n = int(np.prod(shape))
        bits = np.unpackbits(arrays[f"mask/{layer}"], count=n)
        out[layer] = float(bits.mean())
    return out


def most_changed_layer(densities: dict) -> tuple[str, float]:
    """(layer, density) with the lowest density (the first one on ties)."""
    layer = min(densities, key=lambda k: densities[k])
    return layer, densities[layer]
