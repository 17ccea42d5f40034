"""The human-label store: importers, tie policies, agreement statistics, bad input, atomicity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from robustlab import cli
from robustlab.data import labels as L
from robustlab.data import votes as V
from robustlab.data.invariance import load_thesis_set, read_rater_votes
from robustlab.errors import ConfigError, DataError

DATA = Path(
    os.environ.get("ROBUSTLAB_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
VOTES_CSV = DATA / "invariance" / "thesis" / "eps0.3" / "rater_votes.csv"
TIES = [20, 92, 223, 343, 358, 394, 399]


@pytest.fixture(autouse=True)
def _data_env(monkeypatch):
    monkeypatch.setenv("ROBUSTLAB_DATA_DIR", str(DATA))


@pytest.fixture(scope="module")
def table():
    return read_rater_votes(VOTES_CSV)


@pytest.fixture
def thesis(tmp_path):
    store = L.import_thesis(tmp_path / "thesis.json")
    store.save()
    return L.LabelStore.load(tmp_path / "thesis.json")


def test_thesis_import_round_trips_every_vote(thesis, table):
    votes, raters = thesis.vote_matrix()
    assert raters == [f"rater_{i}" for i in range(1, 11)]
    assert np.array_equal(votes, table["votes"])
    assert len(thesis.examples[51].votes) == 9 and "rater_1" not in thesis.examples[51].votes
    e = thesis.examples[7]
    assert (e.source_split, e.source_index, e.eps, e.norm) == ("test", 7, 0.3, "linf")
    assert np.array_equal(e.image, load_thesis_set(0.3).images[7, :, :, 0])


def test_derived_fields_are_written(tmp_path, thesis):
    doc = json.loads((tmp_path / "thesis.json").read_text())
    assert doc["format_version"] == L.FORMAT_VERSION and doc["tie_policy"] == "flag"
    rec = doc["examples"][20]
    assert rec["status"] == "flagged" and rec["human_label"] == -1 and rec["label_changed"] is False
    assert "image" in rec and rec["target_label"] == 4


def test_published_majority_is_a_first_occurrence_mode(table):
    mode = [V.spreadsheet_mode(v) for v in table["votes"]]
    assert np.array_equal(mode, table["majority_label_as_published"])


def test_tie_policies_on_the_thesis_set(thesis, table):
    published = table["majority_label_as_published"]
    assert [
        int(d.example.rsplit("-", 1)[1]) for d in L.published_vs_policy(thesis, published, "drop")
    ] == TIES
    assert [
        int(d.example.rsplit("-", 1)[1]) for d in L.published_vs_policy(thesis, published, "flag")
    ] == TIES
    orig = L.published_vs_policy(thesis, published, "original")
    assert [(int(d.example.rsplit("-", 1)[1]), d.published, d.resolved) for d in orig] == [
        (20, 1, 9),
        (343, 8, 3),
        (358, 4, 7),
    ]
    y, status = thesis.labels("drop")
    assert status.count("dropped") == 7 and (y >= 0).sum() == 493
    assert status[51] == "labelled" and y[51] == 3  # 5 of 9 votes say 3


def test_load_thesis_set_tie_policy(table):
    published = load_thesis_set(0.3)
    assert np.array_equal(published.human_label, table["majority_label_as_published"])
    assert published.label_changed.sum() == 29
    drop = load_thesis_set(0.3, tie_policy="drop")
    assert len(drop) == 493 and not set(TIES) & set(drop.source_index.tolist())
    original = load_thesis_set(0.3, tie_policy="original")
    assert original.label_changed.sum() == 26 and original.human_label[20] == 9
    flag = load_thesis_set(0.3, tie_policy="flag")
    assert np.flatnonzero(flag.human_label < 0).tolist() == TIES
    with pytest.raises(ConfigError, match="tie policy"):
        load_thesis_set(0.3, tie_policy="coin")


def test_thesis_agreement_statistics(thesis):
    votes, raters = thesis.vote_matrix()
    a = L.agreement(votes, raters)
    assert a.n_examples == 500 and a.ties == 7
    assert a.unanimity == pytest.approx(226 / 500)
    assert a.fleiss_kappa == pytest.approx(0.798, abs=5e-4)
    assert set(a.per_rater) == set(raters) and all(0.75 < v < 0.95 for v in a.per_rater.values())


def test_fleiss_kappa_textbook_example():
    # Fleiss (1971) / Wikipedia: 10 subjects, 14 raters, 5 categories -> kappa 0.210
    counts = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    votes = np.array([np.repeat(np.arange(5), row) for row in counts])
    assert L.fleiss_kappa(votes, n_categories=5) == pytest.approx(0.210, abs=5e-4)
    assert L.fleiss_kappa(np.array([[1, 1, 1], [2, 2, 2], [10, 10, -1]])) == pytest.approx(1.0)


def test_tramer_import_uses_published_labels(tmp_path):
    store = L.import_tramer(tmp_path / "t.json", "tramer_linf_eps0.3")
    y, status = store.labels()
    assert set(status) == {"published"} and not store.raters()
    orig = np.array([e.original_label for e in store.examples])
    assert (y != orig).mean() == pytest.approx(0.21)  # README: 21% change their human label
    store.add_vote(store.examples[0].id, "alice", "X")
    assert L.LabelStore.load(tmp_path / "t.json").examples[0].votes == {"alice": V.NOT_A_DIGIT}


@pytest.mark.parametrize("vote", [11, -1, "7.5", "seven", None, True])
def test_votes_outside_0_9_are_rejected(thesis, vote):
    with pytest.raises(DataError, match="vote"):
        thesis.add_vote(thesis.examples[0].id, "alice", vote)
    assert "alice" not in L.LabelStore.load(thesis.path).examples[0].votes


def test_x_and_digits_are_votes():
    assert V.check_vote("x") == V.NOT_A_DIGIT and V.check_vote(10) == 10 and V.check_vote("3") == 3


def test_corrupt_or_newer_store_is_a_clear_error(tmp_path, thesis):
    good = json.loads(thesis.path.read_text())
    bad = tmp_path / "bad.json"
    bad.write_text(thesis.path.read_text()[:5000])
    with pytest.raises(DataError, match="corrupt"):
        L.LabelStore.load(bad)
    bad.write_text(json.dumps({**good, "format_version": L.FORMAT_VERSION + 1}))
    with pytest.raises(DataError, match="newer"):
        L.LabelStore.load(bad)
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(DataError, match="not a robustlab label store"):
        L.LabelStore.load(bad)
    good["examples"][3]["votes"]["rater_1"] = 42
    bad.write_text(json.dumps(good))
    with pytest.raises(DataError, match="outside 0..9"):
        L.LabelStore.load(bad)
    good["examples"][3]["votes"]["rater_1"] = 3
    del good["examples"][3]["image"]
    bad.write_text(json.dumps(good))
    with pytest.raises(DataError, match="corrupt"):
        L.LabelStore.load(bad)


def test_crash_during_save_leaves_store_intact(thesis, monkeypatch):
    before = thesis.path.read_bytes()

    def crash(fd):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk on fire"):
        thesis.add_vote(thesis.examples[0].id, "alice", 4)
    assert thesis.path.read_bytes() == before
    assert [p.name for p in thesis.path.parent.iterdir()] == [thesis.path.name]


def test_rater_votes_csv_rejects_out_of_range(tmp_path):
    text = VOTES_CSV.read_text().splitlines()
    fields = text[1].split(",")
    fields[4] = "12"
    bad = tmp_path / "rater_votes.csv"
    bad.write_text("\n".join([text[0], ",".join(fields)]) + "\n")
    with pytest.raises(DataError, match="outside 0..9"):
        read_rater_votes(bad)
    fields[4] = "X"
    bad.write_text("\n".join([text[0], ",".join(fields)]) + "\n")
    assert read_rater_votes(bad)["votes"][0, 0] == 10


def _candidates(path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(
        path,
        images=rng.random((4, 28, 28), dtype=np.float32),
        source_split=np.array(["train"] * 4),
        source_index=np.array([5, 6, 5, 6]),
        original_label=np.array([2, 1, 2, 1]),
        target_label=np.array([8, 7, 8, 7]),
        eps=np.array([0.3, 0.3, 0.4, 0.4]),
        norm=np.array("linf"),
        generator_version=np.array("linf-1.0"),
    )


def test_label_cli_init_stats_and_errors(tmp_path, capsys):
    npz = tmp_path / "candidates.npz"
    _candidates(npz)
    store = tmp_path / "s.json"
    assert cli.main(["label", "--init-from", str(npz), "--store", str(store)]) == 0
    s = L.LabelStore.load(store)
    assert [e.id for e in s.examples] == [
        "train5-eps0.3",
        "train6-eps0.3",
        "train5-eps0.4",
        "train6-eps0.4",
    ]
    assert s.examples[1].target_label == 7 and s.next_for("ann") is s.examples[0]
    assert cli.main(["label", "--init-from", str(npz), "--store", str(store)]) == 2
    assert "already exists" in capsys.readouterr().err
    np.savez(tmp_path / "bad.npz", images=np.zeros((1, 28, 28)))
    assert (
        cli.main(
            ["label", "--init-from", str(tmp_path / "bad.npz"), "--store", str(tmp_path / "b.json")]
        )
        == 2
    )
    assert "missing array" in capsys.readouterr().err
    thesis = tmp_path / "thesis.json"
    assert cli.main(["label", "--import", "thesis", "--store", str(thesis)]) == 0
    capsys.readouterr()
    assert cli.main(["label", "--stats", "--store", str(thesis)]) == 0
    out = capsys.readouterr().out
    assert (
        "Fleiss' kappa: 0.798" in out and "published majority vs policy original: 3 differ" in out
    )
    assert (
        cli.main(
            [
                "label",
                "--store",
                str(thesis),
                "--import",
                "thesis",
                "--force",
                "--tie-policy",
                "coin",
            ]
        )
        == 2
    )
    assert "unknown tie policy" in capsys.readouterr().err
