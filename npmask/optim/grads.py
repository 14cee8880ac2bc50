"""The gradients an optimiser zeroes, held as views of one flat array per backend and dtype.

Before every backward pass the optimiser sets its parameters' gradients to zero (``zero_grad``);
the layers then add their gradients in (``Module.accumulate_grad``). Zeroing the arrays one by
one is one fill per parameter, and on a GPU every fill is a launch: 170 of them in a masked
WRN-28-4's step. So at its first ``zero_grad`` an optimiser puts each trained parameter's gradient
on its module as a view of one new zero array (one per backend and dtype), and from then on
zeroes that array in one fill. The numbers are the same; only where the gradients live changes.

A gradient array replaced since (``Module.to``, ``freeze``/``unfreeze``) is seen at the next
``zero_grad`` (the module no longer holds the view) and the gradients move to new flat arrays.
Gradients that may share memory (one array for two parameters, views of one array) are kept as
they are and zeroed one by one. Not supported: one gradient array shared by parameters
of two optimisers (each would take it into its own flat array), or two optimisers over the same
parameters (they would take the gradients from each other at every ``zero_grad``).
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import backend_name, get_array_module


class FlatGrads(NamedTuple):
    views: list        # each trained parameter's gradient, in the optimiser's order
    flats: list        # the arrays to fill with zeros (the views' bases)


def same(arrays, kept) -> bool:
    """Whether ``arrays`` are the very arrays ``kept`` (None: nothing kept), in order."""
    return kept is not None and len(arrays) == len(kept) and all(a is b for a, b in zip(arrays, kept))


def zero(refs, held: FlatGrads | None) -> FlatGrads:
    """Zero the gradients of ``refs`` (those not frozen); returns what to pass as ``held`` next time."""
    trained = [ref for ref in refs if ref.grad is not None]
    if not same([ref.grad for ref in trained], held and held.views):
        held = gather(trained)
    for flat in held.flats:
        flat.fill(0)
    return held


def _overlap(arrays) -> bool:
    """Whether two of the arrays may share memory (a non-contiguous one is taken to)."""
    if not all(a.flags.c_contiguous for a in arrays):
        return True
    spans = sorted((start, start + a.nbytes) for a in arrays if a.nbytes
                   for start in [a.data.ptr if hasattr(a.data, "ptr")           # CuPy
                                 else a.__array_interface__["data"][0]])        # NumPy
    return any(lo < end for (_, end), (lo, _) in zip(spans, spans[1:]))


def gather(refs) -> FlatGrads:
    """Each gradient of ``refs`` replaced on its module by a view of a new zero array; the arrays
    kept as they are when two of them may share memory."""
    if _overlap([ref.grad for ref in refs]):
        return FlatGrads([ref.grad for ref in refs], [ref.grad for ref in refs])
    kinds: dict = {}
    for ref in refs:
        kinds.setdefault((backend_name(ref.grad), ref.grad.dtype), []).append(ref)
    views, flats = {}, []
    for same in kinds.values():
        xp = get_array_module(same[0].grad)
        flat = xp.zeros(sum(ref.grad.size for ref in same), dtype=same[0].grad.dtype)
        start = 0
        for ref in same:
            shape, size = ref.grad.shape, ref.grad.size
            ref.module.grads[ref.key] = views[ref.name] = flat[start:start + size].reshape(shape)
            start += size
        flats.append(flat)
    return FlatGrads([views[ref.name] for ref in refs], flats)
