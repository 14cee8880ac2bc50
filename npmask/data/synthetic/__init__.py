"""The built-in synthetic multi-domain benchmark: a base domain for pretraining and five targets.

The paper pretrains on ImageNet and adapts to domains of very different character (digits, traffic
signs, handwritten characters, textures, ...). This module draws a miniature of that setting with
Pillow and NumPy, so every example and test runs without a download:

=========  =======  ======  =====================================================================
domain     classes  mirror  what an image shows
=========  =======  ======  =====================================================================
base       60       yes     one of 20 shapes x 3 fills (solid, striped, spotted), random colours,
                            position, size, rotation, cluttered backgrounds (plays ImageNet)
digits     10       no      a house-number-like digit between two cut-off neighbours, varied
                            fonts and colours, blurred, noisy (SVHN-like)
signs      23       no      traffic-sign-like symbols: speed limits, warnings, arrows (GTSRB-like)
glyphs     50       no      characters of 5 invented alphabets drawn with jittered strokes
                            (Omniglot-like)
textures   14       no      procedural textures: stripes, checks, cells, marble ... (DTD-like)
sketches   16       yes     wobbly line drawings of objects (house, fish, umbrella ...)
=========  =======  ======  =====================================================================

Images are drawn at twice the output size and averaged 2x2 (anti-aliasing), then noise is added.
Everything is a function of (seed, domain, split, chunk), never of the number of worker processes,
so the arrays are identical for the same seed *and the same fonts*. Text uses Pillow's built-in
scalable font and, when present, DejaVu fonts from /usr/share/fonts/truetype/dejavu; the fonts
used are recorded in every meta.json (``extra["fonts"]``) and are part of the cache folder's hash,
so a machine without DejaVu gets (and says it gets) a different, still deterministic benchmark.

Usage::

    root = ensure_synthetic()                  # generate once (about 30 s on 2 cores), then reuse
    base = load_domain(root / "base")
    save_grid(root / "signs", "signs.png")     # look at the images

Command line: ``python -m npmask.data.synthetic [--root DIR] [--grids DIR]``.

One module per domain painter (:mod:`.base`, :mod:`.digits`, :mod:`.signs`, :mod:`.glyphs`,
:mod:`.textures`, :mod:`.sketches`), the fonts and drawing helpers they share (:mod:`.drawing`),
and the generation, caching and grids (:mod:`.generation`).
"""
from .base import BASE_CLASSES
from .digits import DIGIT_CLASSES
from .drawing import DEJAVU_DIR, available_fonts
from .generation import (DOMAINS, LICENCE, TARGETS, VERSION, default_root, ensure_synthetic,
                         generate_domain, save_grid)
from .glyphs import CHARS_PER_ALPHABET, GLYPH_CLASSES, N_ALPHABETS, glyph_prototypes
from .signs import SIGN_CLASSES
from .sketches import SKETCH_CLASSES
from .textures import TEXTURE_CLASSES

__all__ = [
    "BASE_CLASSES", "DIGIT_CLASSES", "SIGN_CLASSES", "GLYPH_CLASSES", "TEXTURE_CLASSES",
    "SKETCH_CLASSES", "N_ALPHABETS", "CHARS_PER_ALPHABET", "glyph_prototypes",
    "DEJAVU_DIR", "available_fonts",
    "DOMAINS", "TARGETS", "VERSION", "LICENCE", "default_root", "ensure_synthetic",
    "generate_domain", "save_grid",
]
