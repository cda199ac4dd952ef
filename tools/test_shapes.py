"""Tests of tools/shapes: the synthetic dataset (numpy + pillow) and the judge (torch).

Run: .venv-tools/bin/python -m pytest -q tools/test_shapes.py
(.venv-tools is made by tools/export.sh; its pinned requirements lack pytest, so
`.venv-tools/bin/pip install pytest` once, or run `.venv-tools/bin/python tools/test_shapes.py`,
which runs the same tests without pytest.) In a venv without numpy/pillow (e.g. .katz/py)
every test skips; without torch or without the committed judge.pt the judge tests skip.

Data flow checked: dataset(seed) -> Sample(image, edges, mask, caption, objects, background,
relation) -> parse_caption(caption) == the sample's attributes; relation holds in the mask's
pixels; stylize/style_score separate styled from plain; edge_iou(edges, edge_map(image)) is
high for a sample and low across samples; judge.prompt_accuracy on fresh images is high
with their captions (also blurred + noisy, and at 128²) and low with shuffled ones; the
judge's slots are in canonical order and their relation maps back to the caption's; a
3-step judge training runs end to end.
"""

import sys
from pathlib import Path

try:
    import pytest
except ImportError:  # the __main__ runner below works without pytest
    pytest = None

sys.path.insert(0, str(Path(__file__).resolve().parent))

try:
    import numpy as np
    import PIL  # noqa: F401

    HAVE_NP = True
except ImportError:
    HAVE_NP = False

try:
    import torch  # noqa: F401

    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False

JUDGE_PT = Path(__file__).resolve().parent / "shapes" / "judge.pt"

if pytest is not None:
    pytestmark = pytest.mark.skipif(not HAVE_NP, reason="numpy/pillow not installed in this venv")
    needs_judge = pytest.mark.skipif(
        not (HAVE_TORCH and JUDGE_PT.exists()), reason="torch or tools/shapes/judge.pt missing"
    )
else:
    def needs_judge(f):
        return f

if HAVE_NP:
    from shapes import dataset as D


def _ds(n=300, seed=7):
    return D.dataset(seed, n)


def test_deterministic_by_seed():
    a, b, c = D.dataset(3, 50), D.dataset(3, 50), D.dataset(4, 50)
    for x, y in zip(a, b):
        assert x.caption == y.caption
        assert np.array_equal(x.image, y.image)
        assert np.array_equal(x.edges, y.edges)
        assert np.array_equal(x.mask, y.mask)
    assert [x.caption for x in a] != [x.caption for x in c]


def test_sample_fields_and_counts():
    ds = _ds(400)
    counts = {1: 0, 2: 0, 3: 0}
    for s in ds:
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert s.edges.shape == (64, 64, 3) and s.edges.dtype == np.uint8
        assert set(np.unique(s.edges)) <= {0, 255}
        assert s.mask.shape == (64, 64) and s.mask.dtype == bool
        assert 1 <= len(s.objects) <= 3
        counts[len(s.objects)] += 1
        assert len({(o.shape, o.colour) for o in s.objects}) == len(s.objects)
        assert (s.relation is not None) == (len(s.objects) == 2)
        # the background colour is the corner pixel
        assert tuple(s.image[0, 0]) == D.BACKGROUNDS[s.background]
    assert all(c > 40 for c in counts.values()), counts
    for n in (1, 2, 3):
        assert len(D.sample(np.random.default_rng(0), 32, n_objects=n).objects) == n
    assert D.sample(np.random.default_rng(0), 128).image.shape == (128, 128, 3)


def test_captions_parse_back():
    for s in _ds(400):
        objs, bg, rel = D.parse_caption(s.caption)
        assert objs == [(o.shape, o.colour) for o in s.objects]
        assert bg == s.background
        assert rel == s.relation
        assert D.caption(s.objects, s.background, s.relation) == s.caption
    assert D.parse_caption("a red circle, a blue square and an orange star on a gray background") == (
        [("circle", "red"), ("square", "blue"), ("star", "orange")], "gray", None)
    assert D.parse_caption("an orange star left of a green circle on a black background") == (
        [("star", "orange"), ("circle", "green")], "black", "left of")
    try:
        D.parse_caption("a cat on a mat")
    except ValueError:
        pass
    else:
        raise AssertionError("parse_caption accepted a non-caption")


def _object_pixels(s, o):
    """Pixels of the mask component that holds object o (all pixels of its colour near it)."""
    col = np.array(D.COLOURS[o.colour], np.int16)
    near = np.abs(s.image.astype(np.int16) - col).max(axis=2) < 12
    h, w = s.mask.shape
    ys, xs = np.nonzero(near & s.mask)
    cx, cy = o.center[0] * w, o.center[1] * h
    keep = np.hypot(xs - cx, ys - cy) <= o.size / 2 * w + 1
    return xs[keep], ys[keep]


def test_relations_hold_in_pixels():
    seen = set()
    for s in _ds(400):
        if len(s.objects) != 2:
            continue
        (x0, y0), (x1, y1) = (_object_pixels(s, o) for o in s.objects)
        assert x0.size > 20 and x1.size > 20, s.caption
        # pixel extents: the subject lies wholly on the named side of the other object's center
        if s.relation == "above":
            assert y0.max() < y1.mean() and y0.mean() < y1.min(), s.caption
        elif s.relation == "below":
            assert y0.min() > y1.mean() and y0.mean() > y1.max(), s.caption
        elif s.relation == "left of":
            assert x0.max() < x1.mean() and x0.mean() < x1.min(), s.caption
        else:
            assert x0.min() > x1.mean() and x0.mean() > x1.max(), s.caption
        seen.add(s.relation)
    assert seen == set(D.RELATIONS)


def test_objects_do_not_overlap_and_colours_are_drawn():
    for s in _ds(200):
        for o in s.objects:
            xs, _ = _object_pixels(s, o)
            assert xs.size > 15, (s.caption, o)


def test_stylize_and_style_score_separate():
    ds = _ds(200, seed=11)
    for st in D.STYLES:
        plain = np.array([D.style_score(s.image, st) for s in ds])
        styl = np.array([D.style_score(D.stylize(s.image, st, s.mask), st) for s in ds])
        assert plain.max() <= 0.2 and plain.mean() < 0.05, (st, plain.max())
        assert styl.min() >= 0.8 and styl.mean() > 0.95, (st, styl.min())
        other = D.STYLES[1 - D.STYLES.index(st)]
        cross = np.array([D.style_score(D.stylize(s.image, other, s.mask), st) for s in ds])
        assert cross.max() <= 0.2, (st, other, cross.max())
    s = ds[0]
    striped = D.stylize(s.image, "stripes", s.mask)
    assert np.array_equal(striped[~s.mask], s.image[~s.mask])  # background untouched
    assert np.abs(striped[s.mask].astype(int) - s.image[s.mask]).max() > 100  # visible stripes
    # without a mask, stripes go over the non-background pixels
    assert D.style_score(D.stylize(s.image, "stripes"), "stripes") >= 0.8


def test_edge_map_matches_condition():
    ds = _ds(200, seed=5)
    matched = np.array([D.edge_iou(s.edges, D.edge_map(s.image)) for s in ds])
    mism = np.array([D.edge_iou(ds[i].edges, D.edge_map(ds[(i + 1) % len(ds)].image)) for i in range(len(ds))])
    assert matched.min() >= 0.7 and matched.mean() >= 0.8, matched.min()
    assert mism.mean() <= 0.15 and np.percentile(mism, 95) <= 0.3, mism.mean()
    e = ds[0].edges
    assert D.edge_iou(e, e) == 1.0
    assert D.edge_iou(e, np.zeros_like(e)) == 0.0
    assert D.edge_iou(np.zeros_like(e), np.zeros_like(e)) == 1.0
    # a 1-px shift is within the tolerance, and not without it
    shifted = np.roll(e, 1, axis=1)
    assert D.edge_iou(e, shifted, tolerance_px=1) > 0.6
    assert D.edge_iou(e, shifted, tolerance_px=0) < D.edge_iou(e, shifted, tolerance_px=1)


def test_dataset_is_deterministic():
    # (its speed is measured by `python tools/shapes/dataset.py`, not asserted here)
    a, b = D.dataset(0, 50), D.dataset(0, 50)
    assert len(a) == 50 and all(np.array_equal(x.image, y.image) and x.caption == y.caption for x, y in zip(a, b))


@needs_judge
def test_judge_prompt_accuracy():
    from shapes import judge as J

    jm = J.load_judge(JUDGE_PT)
    ds = D.dataset(424242, 500)
    images = [s.image for s in ds]
    res = J.prompt_accuracy(images, ds, judge=jm)
    assert res["prompt_accuracy"] >= 0.9, res
    # the same images against shuffled captions: almost never all right
    rng = np.random.default_rng(0)
    caps = [s.caption for s in ds]
    shuffled = [caps[i] for i in rng.permutation(len(caps))]
    bad = J.prompt_accuracy(images, shuffled, judge=jm)
    assert bad["prompt_accuracy"] <= 0.1, bad
    # LoRA styles don't fool it
    styl = [D.stylize(s.image, D.STYLES[i % 2], s.mask) for i, s in enumerate(ds[:200])]
    res_s = J.prompt_accuracy(styl, ds[:200], judge=jm)
    assert res_s["prompt_accuracy"] >= 0.8, res_s


@needs_judge
def test_judge_reads_degraded_images_and_slots():
    from PIL import Image, ImageFilter

    from shapes import judge as J

    jm = J.load_judge(JUDGE_PT)
    ds = D.dataset(515, 200)
    rng = np.random.default_rng(1)
    degraded = [
        np.clip(np.asarray(Image.fromarray(s.image).filter(ImageFilter.GaussianBlur(1.0)), np.float32)
                + rng.normal(0, 8, s.image.shape), 0, 255).astype(np.uint8)
        for s in ds
    ]
    assert J.prompt_accuracy(degraded, ds, judge=jm)["prompt_accuracy"] >= 0.85
    big = [D._render(s.objects, s.background, 128)[0] for s in ds[:50]]  # other sizes are resized
    assert J.prompt_accuracy(big, ds[:50], judge=jm)["prompt_accuracy"] >= 0.9
    for s, p in zip(ds[:50], J.predict([s.image for s in ds[:50]], jm)):
        assert len(p["slots"]) == 3
        filled = [x for x in p["slots"] if x["shape"] != "none"]
        assert len(filled) == len(p["objects"])
        assert all(x["cell"] is None and x["colour"] == "none" for x in p["slots"][len(filled):])
        rows = [x["cell"] // 3 for x in filled]
        assert rows == sorted(rows)  # canonical order: top-to-bottom
        if len(filled) == 2 and len(s.objects) == 2:
            # the slot relation, mapped back to caption order
            first = (filled[0]["shape"], filled[0]["colour"]) == (s.objects[0].shape, s.objects[0].colour)
            rel = p["relation"] if first else D.INVERSE_RELATION[p["relation"]]
            assert rel == s.relation, (s.caption, p)


@pytest.mark.skipif(not HAVE_TORCH, reason="torch missing") if pytest else (lambda f: f)
def test_judge_training_runs():
    import tempfile

    from shapes import judge as J

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "j.pt"
        meta = J.train(out, "cpu", steps=3, batch_size=8, workers=1, heldout=20, log=lambda *a: None)
        assert meta["steps"] == 3 and out.exists()
        J.load_judge(out)


@needs_judge
@needs_judge
def test_judge_onnx_reads_like_the_torch_judge():
    """judge.onnx (shapes.reading.OnnxJudge, what tools/test_demo.py uses without torch) is the
    committed judge.pt: same raw heads to float precision and the same readings."""
    from shapes import judge as J
    from shapes.reading import OnnxJudge, score

    ds = D.dataset(31337, 64)
    images = [s.image for s in ds]
    want = J._raw(J.load_judge(JUDGE_PT), np.stack(images))
    got = OnnxJudge().raw(images)
    for k in want:
        err = np.abs(got[k] - want[k]).max() / (np.abs(want[k]).max() + 1e-12)
        assert err < 1e-4, (k, err)
    caps = [s.caption for s in ds]
    assert score(OnnxJudge().predict(images), caps) == J.prompt_accuracy(images, caps, judge=J.load_judge(JUDGE_PT))


def test_judge_parse_caption_round_trip():
    from shapes import judge as J

    for s in D.dataset(9, 100):
        assert J.parse_caption(s.caption) == D.parse_caption(s.caption)


if __name__ == "__main__":
    # a minimal runner for venvs without pytest
    failed = 0
    for name, fn in list(globals().items()):
        if name.startswith("test_") and callable(fn):
            if not HAVE_NP or (fn.__name__.startswith("test_judge") and not (HAVE_TORCH and JUDGE_PT.exists())):
                print(f"SKIP {name}")
                continue
            try:
                fn()
                print(f"ok   {name}")
            except Exception as e:  # noqa: BLE001
                failed += 1
                print(f"FAIL {name}: {e!r}")
    sys.exit(1 if failed else 0)
