"""The synthetic benchmark: determinism, balanced classes, meta data, cache reuse (tiny sizes)."""
import numpy as np
import pytest

from npmask.data import synthetic
from npmask.data.format import load_domain
from npmask.data.synthetic import DOMAINS, drawing, ensure_synthetic, generate_domain, generation, save_grid

TINY = dict(n_train=60, n_test=50, base_train=120, base_test=60, workers=1)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return ensure_synthetic(tmp_path_factory.mktemp("syn") / "bench", seed=0, **TINY)


@pytest.mark.parametrize("domain", DOMAINS)
def test_same_seed_same_arrays(domain):
    a = generate_domain(domain, "train", 12, seed=5, image_size=16)
    b = generate_domain(domain, "train", 12, seed=5, image_size=16)
    c = generate_domain(domain, "train", 12, seed=6, image_size=16)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].shape == (12, 16, 16, 3) and a[0].dtype == np.uint8
    assert not np.array_equal(a[0], c[0])
    assert a[0].std() > 10  # not blank


def test_result_does_not_depend_on_workers(monkeypatch):
    a = generate_domain("signs", "test", 30, seed=1)
    monkeypatch.setattr(generation, "_CHUNK", 7)  # seeds are per chunk: same chunk size needed
    b = generate_domain("signs", "test", 30, seed=1)
    assert not np.array_equal(a[0], b[0])  # documents that chunk size is part of the recipe
    import multiprocessing
    with multiprocessing.get_context().Pool(2) as pool:
        c = generate_domain("signs", "test", 30, seed=1, pool=pool)
    np.testing.assert_array_equal(b[0], c[0])


def test_domains_meta_and_class_balance(tiny_root):
    expected_mirror = {"base": True, "digits": False, "signs": False, "glyphs": False,
                       "textures": False, "sketches": True}
    for name in DOMAINS:
        d = load_domain(tiny_root / name)
        n_train, n_test = (120, 60) if name == "base" else (60, 50)
        assert d.name == name and d.mirror == expected_mirror[name]
        assert d.train[0].shape == (n_train, 32, 32, 3) and d.test[0].shape[0] == n_test
        counts = np.bincount(d.train[1], minlength=d.num_classes)
        assert counts.max() - counts.min() <= 1  # balanced
        extra = d.meta["extra"]
        assert extra["fonts"] == synthetic.available_fonts() and extra["config"]["seed"] == 0
        assert d.meta["licence"] and d.meta["source"].startswith("npmask synthetic")
    assert load_domain(tiny_root / "base").num_classes >= 50
    assert load_domain(tiny_root / "digits").num_classes == 10


def test_cache_is_reused_and_size_change_regenerates(tiny_root):
    stamp = (tiny_root / "base" / "train.npz").stat().st_mtime_ns
    assert ensure_synthetic(tiny_root, seed=0, **TINY) == tiny_root
    assert (tiny_root / "base" / "train.npz").stat().st_mtime_ns == stamp
    other = dict(TINY, n_test=40)
    ensure_synthetic(tiny_root, seed=0, domains=("glyphs",), **other)
    assert load_domain(tiny_root / "glyphs").test[0].shape[0] == 40


def test_default_root_names_seed_and_hash(monkeypatch, tmp_path):
    monkeypatch.setenv("NPMASK_DATA", str(tmp_path))
    config = generation._config(3, 10, 10, 10, 10, 32, ["x"])
    root = synthetic.default_root(config)
    assert root.parent == tmp_path and root.name.startswith(f"synthetic-v{synthetic.VERSION}-3-")
    assert synthetic.default_root(generation._config(3, 10, 11, 10, 10, 32, ["x"])) != root
    assert synthetic.default_root(generation._config(3, 10, 10, 10, 10, 32, ["y"])) != root


def test_unknown_domain():
    with pytest.raises(ValueError, match="unknown synthetic domain"):
        generate_domain("imagenet", "train", 4)


def test_save_grid(tiny_root, tmp_path):
    from PIL import Image
    path = save_grid(tiny_root / "signs", tmp_path / "g.png", classes=4, per_class=3, zoom=2)
    assert Image.open(path).size == (3 * 32 * 2, 4 * 32 * 2)


def test_progress_says_what_is_generated_and_where_then_nothing(tmp_path, capsys):
    root = tmp_path / "bench"
    ensure_synthetic(root, seed=0, domains=("digits",), progress=True, **TINY)
    err = capsys.readouterr().err
    n = TINY["n_train"] + TINY["n_test"]
    assert f"generating the synthetic benchmark (once; digits: {n} images) into {root}" in err
    assert f"digits: {n} images in" in err and "\r" not in err    # not a terminal: plain lines
    assert sorted(p.name for p in root.iterdir()) == ["digits"]   # only what was asked for
    ensure_synthetic(root, seed=0, domains=("digits",), progress=True, **TINY)
    assert capsys.readouterr().err == ""                          # cached: silent


def test_a_run_generates_only_the_domains_it_needs(monkeypatch, tmp_path):
    from npmask.training import suites
    asked = []
    monkeypatch.setattr(suites, "ensure_synthetic",
                        lambda domains, progress: asked.append((list(domains), progress)) or tmp_path)
    suites.resolve_data_root("synthetic", None, ["digits", "signs"])
    suites.resolve_data_root("synthetic", None)               # the default: the targets, not base
    assert asked == [(["digits", "signs"], True), (list(synthetic.TARGETS), True)]
    with pytest.raises(suites.ConfigError, match="unknown domain.*nope.*of the synthetic"):
        suites.resolve_data_root("synthetic", None, ["digits", "nope"])
    assert len(asked) == 2                                       # refused before generating


def test_each_split_and_chunk_draws_its_own_random_numbers():
    """Labels are seeded per (seed, domain, split) and images per chunk too: train and test are not
    the same sequence, and two chunks of the same labels are not the same images."""
    train = generation._labels(0, "digits", "train", 40, 10)
    test = generation._labels(0, "digits", "test", 40, 10)
    assert sorted(train) == sorted(test) and not np.array_equal(train, test)
    labels = np.arange(4) % 3
    fonts = synthetic.available_fonts()
    first, second = (generation._render_chunk((0, "signs", "train", k, labels, 8, fonts))
                     for k in (0, 1))
    assert not np.array_equal(first, second)


def test_the_glyph_alphabets_are_the_seeds(monkeypatch):
    """The invented characters are drawn from the benchmark's seed, not from a fixed one."""
    seen = []
    real = generation.glyph_prototypes
    monkeypatch.setattr(generation, "glyph_prototypes", lambda seed: seen.append(seed) or real(seed))
    generate_domain("glyphs", "train", 2, seed=7, image_size=8)
    assert seen == [7]


def test_unknown_domains_and_failed_writes_are_errors(tmp_path, monkeypatch):
    """ensure_synthetic refuses an unknown domain before drawing anything, and a failed write of a
    domain no other process completed is raised, not taken for that other process's success."""
    with pytest.raises(ValueError, match="unknown synthetic domain 'nope'"):
        ensure_synthetic(tmp_path / "bench", seed=0, domains=("digits", "nope"), **TINY)
    assert not (tmp_path / "bench").exists()

    def disk_full(*args, **kwargs):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(generation, "write_domain", disk_full)
    with pytest.raises(OSError, match="disk full"):
        ensure_synthetic(tmp_path / "bench", seed=0, domains=("digits",), **TINY)


def test_save_grid_shows_each_class_in_its_row(tiny_root, tmp_path):
    """Row k holds the first images of class k, in order; asking for more classes than the domain
    has gives one row per class."""
    from PIL import Image
    d = load_domain(tiny_root / "digits", splits=("train",))
    images, labels = d.train
    grid = np.asarray(Image.open(save_grid(d, tmp_path / "g.png", classes=99, per_class=2, zoom=1)))
    assert grid.shape == (d.num_classes * 32, 2 * 32, 3)
    for k in (0, d.num_classes - 1):
        for j, i in enumerate(np.flatnonzero(labels == k)[:2]):
            np.testing.assert_array_equal(grid[k * 32:(k + 1) * 32, j * 32:(j + 1) * 32], images[i])


# ------------------------------------------------------------- the shared drawing helpers
def test_gradient_backgrounds_run_from_one_colour_to_the_other():
    """A gradient background mixes its two colours with weights in [0, 1] whatever its angle: every
    pixel lies between them and both ends are reached (not extrapolated past one of them)."""
    seen = 0
    for seed in range(60):
        probe = np.random.default_rng(seed)              # the draws _background starts with
        kind, c1, c2 = probe.integers(4), probe.uniform(0, 255, 3), probe.uniform(0, 255, 3)
        if kind != 1:
            continue
        seen += 1
        img = drawing._background(np.random.default_rng(seed), 32).reshape(-1, 3)
        lo, hi = np.minimum(c1, c2), np.maximum(c1, c2)
        assert (img >= lo - 1e-3).all() and (img <= hi + 1e-3).all(), seed
        np.testing.assert_allclose(img.min(axis=0), lo, atol=0.05 * (hi - lo).max() + 1e-3)
        np.testing.assert_allclose(img.max(axis=0), hi, atol=0.05 * (hi - lo).max() + 1e-3)
    assert seen >= 8


def test_paint_blends_by_the_mask():
    """Mask 255 replaces the canvas by the fill, 0 keeps it, 51 mixes a fifth of the fill in."""
    from PIL import Image
    canvas = np.full((1, 3, 3), 100.0, dtype=np.float32)
    mask = Image.fromarray(np.array([[255, 0, 51]], dtype=np.uint8), "L")
    out = drawing._paint(canvas, mask, (200, 0, 50))
    np.testing.assert_array_equal(out[0, 0], [200, 0, 50])
    np.testing.assert_array_equal(out[0, 1], [100, 100, 100])
    np.testing.assert_allclose(out[0, 2], [120, 80, 90], rtol=1e-6)


def test_unit_coordinates_scale_to_the_drawing_size():
    """Unit coordinates lie in [0, 1]: 1 is the drawing's far edge, S pixels."""
    assert drawing._pixels(np.array([[0.0, 0.0], [1.0, 0.5]]), 8) == [(0.0, 0.0), (8.0, 4.0)]


def test_polyline_draws_a_two_point_line_with_round_caps_of_half_its_width():
    from PIL import Image, ImageDraw
    img = Image.new("L", (40, 40))
    drawing._polyline(ImageDraw.Draw(img), [(10.0, 20.0), (30.0, 20.0)], 6, 255)
    on = np.argwhere(np.asarray(img) > 0)                      # (y, x)
    assert np.asarray(img)[20, 20] == 255                      # the segment itself
    (y0, x0), (y1, x1) = on.min(axis=0), on.max(axis=0)
    assert 6 <= x0 <= 8 and 32 <= x1 <= 34 and 16 <= y0 <= 18 and 22 <= y1 <= 24


def test_arc_is_an_ellipse_with_its_own_radii():
    pts = drawing._arc(0.5, 0.4, 0.3, 0.1, n=33)
    np.testing.assert_allclose(pts[0], pts[-1], atol=1e-12)     # a whole turn closes
    np.testing.assert_allclose([pts[:, 0].min(), pts[:, 0].max()], [0.2, 0.8], atol=1e-12)
    np.testing.assert_allclose([pts[:, 1].min(), pts[:, 1].max()], [0.3, 0.5], atol=1e-12)


def test_chaikin_cuts_each_corner_at_a_quarter_and_keeps_the_end_points():
    pts = drawing._chaikin(np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]), iterations=1)
    np.testing.assert_allclose(pts, [[0, 0], [0.25, 0], [0.75, 0], [1, 0.25], [1, 0.75], [1, 1]])


def test_fonts_are_cached_per_size():
    name = synthetic.available_fonts()[0]
    small, large = drawing._font(name, 11), drawing._font(name, 23)
    assert (small.size, large.size) == (11, 23) and drawing._font(name, 11) is small
