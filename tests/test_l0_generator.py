"""The L0 invariance generator: transforms, the search, difference clusters, the CLI and store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from robustlab.data import labels as L
from robustlab.errors import ConfigError, DataError
from robustlab.invariance import l0
from robustlab.invariance.label_server import LabelServer

DATA = Path(
    os.environ.get("ROBUSTLAB_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def mnist():
    with np.load(DATA / "mnist.npz") as z:
        return {k: (z[k] / np.float32(255)).astype(np.float32) if k[0] == "x" else z[k] for k in z}


@pytest.fixture(scope="module")
def small_pool(mnist):
    """The first 3,000 training images: enough neighbours, fast to search."""
    return l0.BinaryPool(mnist["x_train"][:3000], mnist["y_train"][:3000])


def params(**kw: float) -> np.ndarray:
    p = l0.NEUTRAL.copy()
    for k, v in kw.items():
        p[l0.PARAMS.index(k)] = v
    return p


def bar(cols: slice, rows: slice = slice(6, 22)) -> np.ndarray:
    img = np.zeros((28, 28), dtype=np.float32)
    img[rows, cols] = 1.0
    return img


# ---- transforms ----------------------------------------------------------------------------
def test_neutral_parameters_give_the_identity(mnist):
    x = mnist["x_test"][:5]
    assert np.array_equal(l0.warp(x, l0.NEUTRAL), x)


def test_pure_shift_moves_ink_by_that_many_pixels(mnist):
    x = mnist["x_test"][:5]
    out = l0.warp(x, params(shift_x=3, shift_y=-2))  # 3 px right, 2 px up
    assert np.array_equal(out[:, 0:26, 3:28], x[:, 2:28, 0:25])
    assert not out[:, 26:, :].any() and not out[:, :, :3].any()
    rows, cols = np.nonzero(x[0] > 0.5)
    rows2, cols2 = np.nonzero(out[0] > 0.5)
    assert (cols2.mean() - cols.mean(), rows2.mean() - rows.mean()) == pytest.approx((3, -2))


def test_rotation_turns_about_the_centre_clockwise_on_screen(mnist):
    x = mnist["x_test"][:3]
    out = l0.warp(x, params(angle=np.pi / 2))
    assert np.allclose(out, np.rot90(x, k=-1, axes=(1, 2)), atol=1e-6)


def test_scale_about_the_centre_and_darkening():
    block = np.zeros((1, 28, 28), dtype=np.float32)
    block[0, 8:11, 16:19] = 1.0  # centred at (x, y) = (17, 9): 3.5 right of, 4.5 above (13.5, 13.5)
    out = l0.warp(block, params(scale_x=2, scale_y=2))[0]
    rows, cols = np.nonzero(out)
    w = out[rows, cols]
    centre = (np.average(cols, weights=w), np.average(rows, weights=w))
    assert centre == pytest.approx((13.5 + 2 * 3.5, 13.5 - 2 * 4.5), abs=0.05)
    assert out[3:7, 19:23].min() == 1.0 and out.sum() == pytest.approx(4 * 9, rel=0.1)
    grey = np.full((1, 28, 28), 0.5, dtype=np.float32)
    assert l0.warp(grey, params(darken=4))[0, 14, 14] == pytest.approx((1 - 0.5**4) ** 0.25)
    assert l0.warp(grey, params(darken=0.5))[0, 14, 14] == pytest.approx((1 - 0.5**0.5) ** 2)


def test_binarised_l0_distance_on_hand_made_images():
    a = np.zeros((28, 28), dtype=np.float32)
    b = a.copy()
    b[3, 4:9] = 1.0  # 5 new ink pixels
    b[10, 10] = 0.5  # not ink: binarised at > 0.5
    b[11, 11] = 0.51  # ink
    assert int(l0.l0_distance(a, b)) == 6
    assert l0.l0_distance(np.stack([a, b]), b).tolist() == [6, 0]


def test_ink_kept_on_hand_made_images():
    imgs = np.stack([bar(slice(2, 4)), bar(slice(12, 14)), bar(slice(0, 4))])
    kept = l0.ink_kept(imgs, np.stack([params(shift_x=-8), params(shift_x=8), params(shift_x=-2)]))
    # bar at columns 2-3: leaves the frame going left 8, stays going right 8
    assert kept[0].tolist() == pytest.approx([0.0, 1.0, 1.0])
    assert kept[1].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert kept[2].tolist() == pytest.approx([0.0, 1.0, 0.5])  # columns 0-1 leave going left 2


# ---- stage A -------------------------------------------------------------------------------
def test_search_finds_a_planted_transformed_copy(mnist, small_pool):
    q = mnist["x_test"][[7, 11]]
    y = mnist["y_test"][[7, 11]]
    shift = params(shift_x=3, shift_y=-1)
    # training images whose shift by (3, -1) is exactly the binarised query
    planted = l0.binarise(l0.warp(q, params(shift_x=-3, shift_y=1))).astype(np.float32)
    assert np.array_equal(l0.binarise(l0.warp(planted, shift)), l0.binarise(q))
    x_pool = np.concatenate([mnist["x_train"][:3000], planted, planted])
    y_pool = np.concatenate([mnist["y_train"][:3000], (y + 1) % 10, (y + 1) % 10])
    pool = l0.BinaryPool(x_pool, y_pool)
    cfg = l0.L0Config()
    transforms = np.concatenate([l0.sample_transforms(6, cfg.ranges, 1), shift[None], shift[None]])
    res = l0.search_neighbours(q, y, pool, cfg, transforms=transforms)
    # ties: the first transform, the lowest training index
    assert res.train_index.tolist() == [3000, 3001]
    assert res.distance.tolist() == [0, 0] and res.transform_index.tolist() == [6, 6]
    # each source's first copy excluded: the second copy is found
    res = l0.search_neighbours(
        q, y, pool, cfg, exclude=np.array([3000, 3001]), transforms=transforms
    )
    assert res.train_index.tolist() == [3002, 3003] and res.distance.tolist() == [0, 0]


@pytest.mark.parametrize("darken", [0.25, 0.6, 1.0, 2.5, 4.0])
def test_packed_warp_of_the_pool_matches_one_image_at_a_time(mnist, darken):
    pool = l0.BinaryPool(mnist["x_train"][:200], mnist["y_train"][:200])
    binary = l0.binarise(mnist["x_train"][:200]).astype(np.float32)
    p = params(angle=0.2, scale_x=0.9, scale_y=1.15, shear_x=-0.1, shear_y=0.15, shift_x=1.3)
    p[-1] = darken
    packed = l0.warp_pool(pool, p)
    one_by_one = np.stack([l0.warp_neighbour(pool, i, p) for i in range(200)])
    assert np.array_equal(packed, l0.binarise(one_by_one))
    assert np.allclose(one_by_one, l0.warp(binary, p), atol=1e-6)  # the table is the warp


def test_search_minimum_matches_warping_every_image(mnist):
    """The bit-packed search against warping each training image one by one."""
    pool = l0.BinaryPool(mnist["x_train"][:300], mnist["y_train"][:300])
    src, y = mnist["x_test"][[0, 1, 2]], mnist["y_test"][[0, 1, 2]]
    cfg = l0.L0Config(n_transforms=5, seed=3)
    res = l0.search_neighbours(src, y, pool, cfg)
    for q in range(3):
        best = (10**6, 0, 0)
        for t, p in enumerate(res.transforms):
            kept = l0.ink_kept(mnist["x_train"][:300], p[None])[:, 0] > cfg.ink_kept
            for i in np.flatnonzero((pool.labels != y[q]) & kept):
                d = int(l0.l0_distance(l0.warp_neighbour(pool, i, p), src[q]))
                best = min(best, (d, t, i))
        assert (res.distance[q], res.transform_index[q], res.train_index[q]) == best


def test_ink_filter_excludes_transforms_that_push_ink_out():
    query = bar(slice(0, 2))
    train = bar(slice(8, 10)) + bar(slice(0, 6))  # shifted left by 8: the bar lands on the query
    other = bar(slice(20, 28))  # far from the query under every transform tried
    pool = l0.BinaryPool(np.stack([train, other]), np.array([1, 1]))
    shift = params(shift_x=-8)[None]
    strict = l0.search_neighbours(query[None], [0], pool, l0.L0Config(), transforms=shift)
    assert strict.train_index[0] == 1  # the 6-column block leaves the frame: 25 % kept
    loose = l0.search_neighbours(
        query[None], [0], pool, l0.L0Config(ink_kept=0.2), transforms=shift
    )
    assert loose.train_index[0] == 0 and loose.distance[0] == 0


def test_search_is_deterministic_from_the_seed(mnist, small_pool):
    src, y = mnist["x_test"][:3], mnist["y_test"][:3]
    a = l0.search_neighbours(src, y, small_pool, l0.L0Config(n_transforms=8, seed=5))
    b = l0.search_neighbours(src, y, small_pool, l0.L0Config(n_transforms=8, seed=5))
    c = l0.sample_transforms(8, l0.TransformRanges(), 6)
    assert np.array_equal(a.transforms, b.transforms) and not np.array_equal(a.transforms, c)
    assert np.array_equal(a.train_index, b.train_index) and np.array_equal(a.distance, b.distance)
    lo, hi = l0.TransformRanges().bounds()
    assert (a.transforms >= lo).all() and (a.transforms <= hi).all()
    assert np.array_equal(a.transforms[0], l0.NEUTRAL)


def test_sources_are_searched_in_blocks_with_the_same_result(mnist, small_pool, monkeypatch):
    src, y = mnist["x_test"][:5], mnist["y_test"][:5]
    cfg = l0.L0Config(n_transforms=4)
    whole = l0.search_neighbours(src, y, small_pool, cfg, exclude=np.array([-1, 7, -1, -1, 9]))
    monkeypatch.setattr(l0, "_BLOCK", 2)
    blocks = l0.search_neighbours(src, y, small_pool, cfg, exclude=np.array([-1, 7, -1, -1, 9]))
    for k in ("distance", "train_index", "transform_index"):
        assert np.array_equal(getattr(whole, k), getattr(blocks, k))


# ---- stage B -------------------------------------------------------------------------------
def blobs() -> tuple[np.ndarray, np.ndarray]:
    source = np.zeros((28, 28), dtype=np.float32)
    neighbour = source.copy()
    neighbour[2:5, 2:5] = 0.9  # 9 pixels
    neighbour[20:24, 20:24] = 0.8  # 16 pixels
    neighbour[12:14, 2:7] = 0.7  # 10 pixels
    neighbour[2, 25] = 1.0  # one isolated pixel: DBSCAN noise
    return source, neighbour


def test_one_candidate_per_non_empty_cluster_subset():
    source, neighbour = blobs()
    labels = l0.difference_clusters(source, neighbour)
    assert sorted(np.bincount(labels[labels >= 0]).tolist()) == [9, 10, 16]
    assert labels[2, 25] == -1  # noise
    subsets, n = l0.cluster_subsets(source, neighbour, l0.L0Config())
    assert n == 3 and len(subsets) == 7
    assert sorted(s.clusters for s in subsets) == sorted(
        [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    )
    for s in subsets:
        union = np.isin(labels, s.clusters)
        assert s.changed_pixels == union.sum()
        assert np.array_equal(s.image[union], neighbour[union])
        assert np.array_equal(s.image[~union], source[~union])  # noise pixel never taken
        assert s.image.dtype == np.float32
    capped, n = l0.cluster_subsets(source, neighbour, l0.L0Config(max_clusters=2))
    assert n == 3 and len(capped) == 3
    assert max(s.changed_pixels for s in capped) == 26  # the two largest: 16 + 10


def test_candidates_from_real_images(mnist, small_pool):
    src, y = mnist["x_test"][:4], mnist["y_test"][:4]
    res = l0.generate_l0(src, y, small_pool, l0.L0Config(n_transforms=6), source_index=np.arange(4))
    assert any(res.candidates)
    for q, cands in enumerate(res.candidates):
        if not cands:
            continue
        nb = l0.warp_neighbour(small_pool, cands[0].neighbour_index, np.array(cands[0].transform))
        labels = l0.difference_clusters(src[q], nb)
        assert cands[0].distance == l0.l0_distance(nb, src[q]) == res.search.distance[q]
        used = min(cands[0].n_clusters, 6)
        assert len(cands) == 2**used - 1 and [c.rank for c in cands] == list(
            range(1, len(cands) + 1)
        )
        for c in cands:
            assert c.changed_pixels == np.isin(labels, c.clusters).sum()
            # counted independently: the pixels the candidate took from the neighbour
            assert c.changed_pixels == int((c.image != src[q]).sum())
            assert c.target_label != y[q] == c.original_label and c.source_index == q
            assert c.target_label == small_pool.labels[c.neighbour_index]
            assert 0 <= c.knn_target_share <= 1


def test_knn_share_ties_exclusion_and_ranking(mnist):
    a, b = mnist["x_train"][0], mnist["x_train"][1]
    pool = l0.BinaryPool(np.stack([a, a, b, b, b]), np.array([3, 5, 3, 3, 3]))
    assert l0.knn_target_share(a[None], 3, pool, k=1).tolist() == [1.0]  # tie: lower index
    assert l0.knn_target_share(a[None], 3, pool, k=1, exclude=0).tolist() == [0.0]
    assert l0.knn_target_share(a[None], 5, pool, k=4).tolist() == [0.25]
    base = l0.L0Candidate(
        image=a, source_split="test", source_index=1, original_label=3, target_label=5,
        neighbour_index=0, changed_pixels=0, clusters=(0,), n_clusters=3, distance=40,
        transform=tuple(l0.NEUTRAL),
    )  # fmt: skip
    cands = [
        replace(base, changed_pixels=30, clusters=(0, 1), knn_target_share=0.9),
        replace(base, changed_pixels=12, clusters=(0,), knn_target_share=0.2),
        replace(base, changed_pixels=20, clusters=(1,), knn_target_share=0.6),
        replace(base, changed_pixels=8, clusters=(2,), knn_target_share=0.5),
        replace(base, changed_pixels=5, clusters=(3,), knn_target_share=0.2),
    ]
    ranked = l0.rank_candidates(cands)
    # majority of the target class: fewest pixels first; then highest share, fewest pixels
    assert [c.changed_pixels for c in ranked] == [20, 30, 8, 5, 12]
    assert [c.rank for c in ranked] == [1, 2, 3, 4, 5]


def test_generate_is_deterministic_from_the_seed(mnist, small_pool):
    src, y = mnist["x_test"][5:7], mnist["y_test"][5:7]
    runs = [
        l0.generate_l0(src, y, small_pool, l0.L0Config(n_transforms=4, seed=s)) for s in (2, 2, 9)
    ]
    flat = [
        [(c.clusters, c.rank, c.image.tobytes()) for p in r.candidates for c in p] for r in runs
    ]
    assert flat[0] == flat[1]
    assert not np.array_equal(runs[0].search.transforms, runs[2].search.transforms)


# ---- boundaries ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((2, 28, 28), dtype=np.uint8), "expected float32"),
        (np.zeros((2, 28, 28), dtype=np.float64), "expected float32"),
        (np.full((2, 28, 28), 255, dtype=np.float32), "looks like 0..255"),
        (np.full((2, 28, 28), np.nan, dtype=np.float32), "NaN"),
        (np.zeros((2, 784), dtype=np.float32), "expected shape"),
        (np.zeros((0, 28, 28), dtype=np.float32), "empty"),
    ],
)
def test_images_must_be_float32_in_unit_range(small_pool, bad, message):
    with pytest.raises(DataError, match=message):
        l0.warp(bad, l0.NEUTRAL)
    with pytest.raises(DataError, match=message):
        l0.search_neighbours(bad, np.zeros(len(bad), np.int64), small_pool, l0.L0Config())
    with pytest.raises(DataError, match=message):
        l0.BinaryPool(bad, np.zeros(len(bad), np.int64))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scale_min": 1.3, "scale_max": 1.2}, "scale_min=1.3 > scale_max=1.2: the scale range is"),
        ({"darken_min": 5.0}, "darken_min=5.0 > darken_max=4.0"),
        ({"shift": float("nan")}, "shift must be a finite number >= 0"),
        ({"rotation": -0.1}, "rotation must be a finite number >= 0"),
        ({"scale_min": 0.0}, "scale_min=0.0 must be > 0"),
    ],
)
def test_empty_or_invalid_range_is_a_one_line_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as err:
        l0.TransformRanges(**kwargs)
    assert "\n" not in str(err.value)


def test_config_budget_must_be_positive():
    with pytest.raises(ConfigError, match="n_transforms must be an integer >= 1"):
        l0.L0Config(n_transforms=0)


# ---- the command and the label store -------------------------------------------------------
def test_generate_l0_command_then_label_store(tmp_path):
    folder = tmp_path / "tracking"
    env = {
        **os.environ,
        "ROBUSTLAB_DATA_DIR": str(DATA),
        "ROBUSTLAB_TRACKING_DIR": str(folder),
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
    }
    env.pop("MLFLOW_RUN_ID", None)
    out = tmp_path / "candidates.npz"
    gen = subprocess.run(
        [str(BIN / "robustlab"), "generate", "--norm", "l0", "--split", "test", "--start", "0"]
        + ["--count", "2", "--transforms", "30", "--max-candidates", "3", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert gen.returncode == 0, gen.stderr[-3000:]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    [run] = client.search_runs([client.get_experiment_by_name("robustlab").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["norm"] == "l0"
    assert run.data.params["transforms"] == "30" and "eps" not in run.data.params
    assert {"candidates.npz", "candidates_grid.png"} <= {
        f.path for f in client.list_artifacts(run.info.run_id)
    }
    with np.load(out) as z:
        a = {k: z[k] for k in z.files}
    n = len(a["images"])
    assert a["images"].dtype == np.float32 and a["images"].shape == (n, 28, 28)
    assert a["images"].min() >= 0 and a["images"].max() <= 1
    assert str(a["norm"]) == "l0" and str(a["generator_version"]).startswith("l0-")
    assert set(a["source_index"].tolist()) <= {0, 1} and (a["source_split"] == "test").all()
    assert (a["eps"] == 0).all() and (a["rank"] >= 1).all() and (a["rank"] <= 3).all()
    assert (a["rank"] <= a["n_candidates"]).all() and (
        a["target_label"] != a["original_label"]
    ).all()
    with np.load(DATA / "mnist.npz") as z:
        src = (z["x_test"][a["source_index"]] / np.float32(255)).astype(np.float32)
    assert np.array_equal(a["changed_pixels"], (a["images"] != src).sum(axis=(1, 2)))

    store = tmp_path / "labels.json"
    lab = subprocess.run(
        [str(BIN / "robustlab"), "label", "--store", str(store), "--init-from", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert lab.returncode == 0, lab.stderr[-3000:]
    s = L.LabelStore.load(store)
    assert len(s) == n
    for k, e in enumerate(s.examples):
        assert e.id == f"test{a['source_index'][k]}-l0-{a['rank'][k]}" and e.norm == "l0"
        assert (e.changed_pixels, e.rank, e.n_candidates) == (
            a["changed_pixels"][k],
            a["rank"][k],
            a["n_candidates"][k],
        )
        assert e.target_label == a["target_label"][k]
    e = s.examples[0]
    server = LabelServer(store, "ann", port=0)
    try:
        payload = server.next_payload()
    finally:
        server.server_close()
    assert payload["context"] == (
        f"candidate {e.rank} of {e.n_candidates} for MNIST test image {e.source_index}, "
        f"{e.changed_pixels} pixels changed"
    )
    assert "towards" not in payload["context"]  # never the class it was moved towards


@pytest.mark.slow
def test_generate_l0_entry_point_through_mlflow_run(tracking, tmp_path):
    """The MLproject entry point `generate_l0` (docs/invariance.md)."""
    from robustlab.tracking import ensure_experiment
    from tests.test_e2e_vanilla import mlflow_run

    exp = ensure_experiment("robustlab")
    out = mlflow_run(
        "generate_l0", tmp_path, "split=test", "start=3", "count=1", "transforms=10",
        "max_candidates=2", f"data_dir={DATA}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    [run] = MlflowClient().search_runs([exp])
    assert run.info.status == "FINISHED"
    assert {k: run.data.params[k] for k in ("norm", "transforms", "max_candidates", "seed")} == {
        "norm": "l0",
        "transforms": "10",
        "max_candidates": "2",
        "seed": "0",
    }


def test_store_without_candidate_fields_still_loads(tmp_path):
    src, _ = blobs()
    store = L.store_from_arrays(
        tmp_path / "old.json", src[None], source_split="test", source_index=np.array([3]),
        original_label=np.array([1]), target_label=np.array([7]), eps=0.3, norm="linf",
    )  # fmt: skip
    store.save()
    doc = json.loads((tmp_path / "old.json").read_text())
    assert not set(L.CANDIDATE_FIELDS) & set(doc["examples"][0])  # written as before
    e = L.LabelStore.load(tmp_path / "old.json").examples[0]
    assert (e.changed_pixels, e.rank, e.n_candidates) == (None, None, None)
    server = LabelServer(tmp_path / "old.json", "ann", port=0)
    try:
        assert "context" not in server.next_payload()
    finally:
        server.server_close()
