import pytest

from crossrank.errors import InvalidArgumentError
from crossrank.evaluate import read_qrels, read_run, write_qrels, write_run


def test_qrels_round_trip(tmp_path):
    qrels = {"q1": {"images/000001.png": 1, "images/000002.png": 0}, "q2": {"images/000003.png": 2}}
    path = write_qrels(tmp_path / "qrels.txt", qrels)
    assert path.read_text().splitlines()[0] == "q1 0 images/000001.png 1"
    assert read_qrels(path) == qrels


def test_run_round_trip_keeps_order_and_exact_scores(tmp_path):
    run = {"q1": [("a", 0.9), ("b", 0.30000000000000004), ("c", -1.5)], "q2": [("d", 2.0)]}
    path = write_run(tmp_path / "sub" / "x.run", run, tag="crossrank-fs")
    assert path.read_text().splitlines()[0] == "q1 Q0 a 1 0.9 crossrank-fs"
    assert read_run(path) == run


def test_float32_scores_are_written_exactly(tmp_path):
    import numpy as np

    scores = np.array([0.7, 0.1], dtype=np.float32)
    path = write_run(tmp_path / "r.run", {"q": [("a", scores[0]), ("b", scores[1])]})
    assert [s for _, s in read_run(path)["q"]] == [float(scores[0]), float(scores[1])]


def test_tied_scores_are_written_strictly_decreasing_in_list_order(tmp_path):
    run = {"q": [("z", 1.0), ("a", 1.0), ("m", 1.0), ("b", 0.5), ("c", 0.5)]}
    path = write_run(tmp_path / "t.run", run)
    lines = [line.split() for line in path.read_text().splitlines()]
    written = [float(f[4]) for f in lines]
    assert all(x > y for x, y in zip(written, written[1:], strict=False))
    assert written == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.5], abs=1e-12)
    # Any tool that orders by score alone, whatever its tie rule, reads back the list order.
    by_score = sorted(reversed(lines), key=lambda f: -float(f[4]))
    assert [f[2] for f in by_score] == ["z", "a", "m", "b", "c"]
    assert [d for d, _ in read_run(path)["q"]] == ["z", "a", "m", "b", "c"]


def test_read_run_orders_by_score_then_rank(tmp_path):
    path = tmp_path / "r.run"
    path.write_text(
        "q1 Q0 low 3 0.1 t\n\nq1 Q0 tie_rank2 2 0.5 t\nq1 Q0 tie_rank1 1 0.5 t\nq1 Q0 top 9 0.9 t\n"
    )
    assert read_run(path) == {
        "q1": [("top", 0.9), ("tie_rank1", 0.5), ("tie_rank2", 0.5), ("low", 0.1)]
    }


def test_empty_rankings_write_no_lines(tmp_path):
    path = write_run(tmp_path / "r.run", {"q1": [], "q2": [("a", 1.0)]})
    assert read_run(path) == {"q2": [("a", 1.0)]}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", r"qrels file .* is empty"),
        ("q1 0 a\n", r"line 1: expected 4 fields `qid 0 docid rel`, got 3: 'q1 0 a'"),
        ("q1 0 a 1\n\nq1 0 b 1.0\n", r"line 3: rel must be an int, got '1.0'"),
        ("q1 0 a 1\nq1 0 a 0\n", r"line 2: query 'q1' judges doc 'a' a second time"),
    ],
)
def test_malformed_qrels_are_refused_with_the_line(tmp_path, text, match):
    path = tmp_path / "qrels.txt"
    path.write_text(text)
    with pytest.raises(InvalidArgumentError, match=match):
        read_qrels(path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("\n\n", r"run file .* is empty"),
        ("q1 Q0 a 1 0.5\n", r"line 1: expected 6 fields `qid Q0 docid rank score tag`, got 5"),
        ("q1 Q0 a 1 0.5 t\nq1 Q0 b first 0.4 t\n", r"line 2: rank must be an int, got 'first'"),
        ("q1 Q0 a 1 high t\n", r"line 1: score must be a number, got 'high'"),
        ("q1 Q0 a 1 nan t\n", r"line 1: score is NaN"),
        (
            "q1 Q0 a 1 0.5 t\nq2 Q0 a 1 0.5 t\nq1 Q0 a 2 0.4 t\n",
            r"line 3: query 'q1' lists doc 'a' again \(first at line 1\)",
        ),
    ],
)
def test_malformed_runs_are_refused_with_the_line(tmp_path, text, match):
    path = tmp_path / "x.run"
    path.write_text(text)
    with pytest.raises(InvalidArgumentError, match=match):
        read_run(path)


def test_missing_files_are_refused(tmp_path):
    with pytest.raises(InvalidArgumentError, match=r"qrels file .*nope.txt does not exist"):
        read_qrels(tmp_path / "nope.txt")
    with pytest.raises(InvalidArgumentError, match=r"run file .*nope.run does not exist"):
        read_run(tmp_path / "nope.run")


def test_unreadable_file_is_refused(tmp_path):
    path = tmp_path / "bin.run"
    path.write_bytes(b"\xff\xfe\x00q1")
    with pytest.raises(InvalidArgumentError, match=r"run file .* cannot be read"):
        read_run(path)


@pytest.mark.parametrize(
    ("run", "tag", "match"),
    [
        (
            {"q": [("a", 0.1), ("b", 0.2)]},
            "t",
            r"run\['q'\]: the score at rank 2 \(0.2\) is higher than at rank 1 \(0.1\)",
        ),
        (
            {"q": [("my image.png", 0.1)]},
            "t",
            r"run\['q'\] rank 1 doc id must be a non-empty str without whitespace",
        ),
        (
            {"q 1": [("a", 0.1)]},
            "t",
            r"query id must be a non-empty str without whitespace .*, got 'q 1'",
        ),
        ({"q": [("a", 0.1)]}, "", r"tag must be a non-empty str without whitespace"),
        ({"q": [("a", float("nan"))]}, "t", r"rank 1: score must be finite, got nan"),
        ({"q": [("a", float("-inf"))]}, "t", r"rank 1: score must be finite, got -inf"),
        ({"q": [("a", "high")]}, "t", r"rank 1: score must be a number, got 'high'"),
        (
            {"q": [("a", 0.2), ("a", 0.1)]},
            "t",
            r"run\['q'\] lists doc 'a' twice \(again at rank 2\)",
        ),
        ({"q": ["a"]}, "t", r"run\['q'\] rank 1 must be a \(docid, score\) pair, got 'a'"),
        ([("q", "a", 0.1)], "t", r"run must be a dict"),
    ],
)
def test_bad_runs_are_not_written(tmp_path, run, tag, match):
    path = tmp_path / "x.run"
    with pytest.raises(InvalidArgumentError, match=match):
        write_run(path, run, tag=tag)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("qrels", "match"),
    [
        ({"q": {"a": 1.5}}, r"qrels\['q'\]\['a'\] must be an int relevance, got 1.5"),
        ({"q": {"a b": 1}}, r"qrels\['q'\] doc id must be a non-empty str without whitespace"),
        ({"": {"a": 1}}, r"query id must be a non-empty str without whitespace .*, got ''"),
    ],
)
def test_bad_qrels_are_not_written(tmp_path, qrels, match):
    with pytest.raises(InvalidArgumentError, match=match):
        write_qrels(tmp_path / "q.txt", qrels)
    assert list(tmp_path.iterdir()) == []
