import math

import numpy as np
import pytest

from crossrank.errors import InvalidArgumentError
from crossrank.evaluate import (
    METRIC_NAMES,
    compute_metrics,
    ranx_name,
    read_qrels,
    read_run,
    write_qrels,
    write_run,
)

QRELS = {
    "q1": {"a": 1, "b": 0, "c": 2},  # graded; b is judged but not relevant
    "q2": {"x": 1},
    "q3": {"y": 0},  # no relevant doc: excluded
    "q4": {"z": 1},  # not in the run: scores 0
    "q6": {"m": 1},
}
RUN = {
    "q1": ["b", "c", "d", "a"],
    "q2": ["u1", "u2", "u3", "u4", "u5", "x", "u7", "u8", "u9", "u10", "u11"],
    "q3": ["y"],
    "q5": ["a"],  # not in the qrels: ignored
    "q6": ["m"],
}


def _ndcg_q1():
    dcg = 2 / math.log2(3) + 1 / math.log2(5)  # c (rel 2) at rank 2, a (rel 1) at rank 4
    idcg = 2 / math.log2(2) + 1 / math.log2(3)  # c then a
    return dcg / idcg


def test_hand_computed_metrics():
    report = compute_metrics(RUN, QRELS)
    # Evaluated: q1, q2, q4, q6.
    expected = {
        "R@1": (0 + 0 + 0 + 1) / 4,
        "R@5": (1 + 0 + 0 + 1) / 4,
        "R@10": (1 + 1 + 0 + 1) / 4,
        "MRR@10": (1 / 2 + 1 / 6 + 0 + 1) / 4,
        "nDCG@10": (_ndcg_q1() + 1 / math.log2(7) + 0 + 1) / 4,
        "P@10": (2 / 10 + 1 / 10 + 0 + 1 / 10) / 4,
    }
    assert list(report.values) == list(METRIC_NAMES)
    for name, value in expected.items():
        assert report.values[name] == pytest.approx(value, abs=1e-12), name
    assert report.n_queries == 4
    assert report.excluded_qids == ["q3"]
    assert report.missing_qids == ["q4"]
    assert report.unjudged_qids == ["q5"]
    assert report.per_query["q2"]["MRR@10"] == pytest.approx(1 / 6)
    assert report.per_query["q4"] == dict.fromkeys(METRIC_NAMES, 0.0)
    assert set(report.per_query) == {"q1", "q2", "q4", "q6"}


def test_queries_without_relevant_docs_never_count_as_zeros():
    with_excluded = compute_metrics(RUN, QRELS)
    without = compute_metrics(RUN, {q: j for q, j in QRELS.items() if q != "q3"})
    assert with_excluded.values == without.values
    assert without.excluded_qids == []


def test_relevance_below_one_is_not_relevant_and_gains_are_graded():
    qrels = {"q": {"a": 3, "b": 1, "neg": -1, "zero": 0}}
    report = compute_metrics({"q": ["neg", "zero", "b", "a"]}, qrels)
    dcg = 1 / math.log2(4) + 3 / math.log2(5)
    idcg = 3 / math.log2(2) + 1 / math.log2(3)
    assert report.values["nDCG@10"] == pytest.approx(dcg / idcg, abs=1e-12)
    assert report.values["MRR@10"] == pytest.approx(1 / 3)
    assert report.values["P@10"] == pytest.approx(2 / 10)


def test_cutoffs_only_look_at_the_top_k():
    ranked = [f"n{i}" for i in range(10)] + ["rel"]  # the relevant doc at rank 11
    report = compute_metrics(
        {"q": ranked},
        {"q": {"rel": 1}},
        metrics=["R@10", "MRR@10", "nDCG@10", "P@10", "R@11", "MRR@11"],
    )
    assert report.values == {
        "R@10": 0.0,
        "MRR@10": 0.0,
        "nDCG@10": 0.0,
        "P@10": 0.0,
        "R@11": 1.0,
        "MRR@11": pytest.approx(1 / 11),
    }


def test_scored_pairs_count_in_list_order_not_by_score():
    pairs = {
        "q1": [("b", 0.1), ("c", 0.9), ("d", 0.5), ("a", 0.7)]
    }  # scores deliberately out of order
    assert (
        compute_metrics(pairs, {"q1": QRELS["q1"]}).values
        == compute_metrics({"q1": RUN["q1"]}, {"q1": QRELS["q1"]}).values
    )


def test_to_dict_is_json_ready():
    import json

    report = compute_metrics(RUN, QRELS, metrics="R@1")
    out = json.loads(json.dumps(report.to_dict(per_query=True)))
    assert out["values"] == {"R@1": 0.25}
    assert out["excluded_qids"] == ["q3"]
    assert out["per_query"]["q6"] == {"R@1": 1.0}
    assert "per_query" not in report.to_dict()


def test_ranx_names():
    assert [ranx_name(m) for m in METRIC_NAMES] == [
        "hit_rate@1",
        "hit_rate@5",
        "hit_rate@10",
        "mrr@10",
        "ndcg@10",
        "precision@10",
    ]


@pytest.mark.parametrize(
    ("run", "qrels", "metrics", "match"),
    [
        (RUN, QRELS, ["R@0"], r"metric must be R@K, MRR@K, nDCG@K or P@K with K >= 1"),
        (RUN, QRELS, ["recall@10"], r"metric must be R@K"),
        (RUN, QRELS, [], r"metrics is empty"),
        (
            RUN,
            {"q": {"a": 0}},
            METRIC_NAMES,
            r"no query in the qrels has a relevant doc \(rel >= 1\) among 1 queries",
        ),
        (RUN, {}, METRIC_NAMES, r"no query in the qrels has a relevant doc"),
        (RUN, {1: {"a": 1}}, METRIC_NAMES, r"qrels query ids must be str, got 1"),
        (
            RUN,
            {"q": {"a": 1.0}},
            METRIC_NAMES,
            r"qrels\['q'\]\['a'\] must be an int relevance, got 1.0",
        ),
        (RUN, {"q": {7: 1}}, METRIC_NAMES, r"qrels\['q'\] doc ids must be str, got 7"),
        (RUN, {"q": ["a"]}, METRIC_NAMES, r"qrels\['q'\] must be a dict"),
        (RUN, [("q", "a", 1)], METRIC_NAMES, r"qrels must be a dict"),
        (
            {"q": ["a", "b", "a"]},
            {"q": {"a": 1}},
            METRIC_NAMES,
            r"run\['q'\] lists doc 'a' twice \(again at rank 3\)",
        ),
        ({"q": "ab"}, {"q": {"a": 1}}, METRIC_NAMES, r"run\['q'\] must be a list of doc ids"),
        (
            {"q": [3]},
            {"q": {"a": 1}},
            METRIC_NAMES,
            r"run\['q'\] rank 1: doc ids must be str, got 3",
        ),
        ({"u": ["a", "a"]}, {"q": {"a": 1}}, METRIC_NAMES, r"run\['u'\] lists doc 'a' twice"),
        ([["q", "a"]], {"q": {"a": 1}}, METRIC_NAMES, r"run must be a dict"),
    ],
)
def test_bad_input_is_refused(run, qrels, metrics, match):
    with pytest.raises(InvalidArgumentError, match=match):
        compute_metrics(run, qrels, metrics=metrics)


def _random_benchmark(seed, graded):
    """~50 queries over 40 docs: tied scores, short and empty rankings, and qid mismatches."""
    rng = np.random.default_rng(seed)
    docs = [f"images/{i:06d}.png" for i in range(40)]
    qrels, run = {}, {}
    for i in range(50):
        qid = f"q{i:03d}"
        judged = rng.choice(40, size=rng.integers(1, 9), replace=False)
        rels = rng.integers(0, 4 if graded else 2, size=len(judged))
        if i % 10 == 3:
            rels[:] = 0  # no relevant doc: crossrank excludes it, ranx scores it 0
        qrels[qid] = {docs[j]: int(r) for j, r in zip(judged, rels, strict=True)}
        if i % 10 == 7:
            continue  # in the qrels, not in the run
        n = int(rng.choice([0, 3, 9, 10, 15, 30]))
        picked = rng.choice(40, size=n, replace=False)
        # Scores on a coarse grid: many ties, listed in a shuffled order (not docid order);
        # relevant docs get a boost so that every metric sees hits at varied ranks.
        boost = np.array([0.5 * (qrels[qid].get(docs[j], 0) > 0) for j in picked])
        scores = np.round(rng.random(n) + boost, 1)
        order = np.lexsort((rng.random(n), -scores))
        run[qid] = [(docs[picked[j]], float(scores[j])) for j in order]
    for i in range(5):
        run[f"extra{i}"] = [(docs[i], 1.0)]  # in the run, not in the qrels
    return qrels, run


@pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaTypeSafetyWarning")
@pytest.mark.parametrize(("seed", "graded"), [(0, True), (1, False)])
def test_metrics_equal_ranx_on_the_same_run_files(tmp_path, seed, graded):
    from ranx import Qrels, Run, evaluate

    qrels, run = _random_benchmark(seed, graded)
    qrels_path = write_qrels(tmp_path / "qrels.txt", qrels)
    run_path = write_run(tmp_path / "first_stage.run", run, tag="fs")

    ours = compute_metrics(read_run(run_path), read_qrels(qrels_path))
    forced_out = {f"q{i:03d}" for i in range(50) if i % 10 == 3}
    assert forced_out <= set(ours.excluded_qids)
    assert ours.n_queries == 50 - len(ours.excluded_qids) >= 30
    assert ours.unjudged_qids == [f"extra{i}" for i in range(5)]
    assert len(ours.missing_qids) >= 5  # the skipped ones, plus those whose list was empty

    ranx_qrels = Qrels.from_file(str(qrels_path), kind="trec")
    ranx_run = Run.from_file(str(run_path), kind="trec").make_comparable(ranx_qrels)
    names = [ranx_name(m) for m in METRIC_NAMES]
    per_query = evaluate(ranx_qrels, ranx_run, names, return_mean=False, save_results_in_run=False)
    qids = list(ranx_run.get_query_ids())
    assert sorted(qids) == sorted(qrels)
    for metric, rname in zip(METRIC_NAMES, names, strict=True):
        theirs = dict(zip(qids, per_query[rname], strict=True))
        for qid in ours.excluded_qids:
            assert theirs[qid] == 0.0  # the zero ranx averages in, that crossrank leaves out
        for qid, values in ours.per_query.items():
            assert values[metric] == pytest.approx(theirs[qid], abs=1e-9), (metric, qid)
        kept = [theirs[q] for q in qids if q not in ours.excluded_qids]
        assert ours.values[metric] == pytest.approx(np.mean(kept), abs=1e-9), metric
    # The run is not degenerate: every metric takes more than one value over the queries.
    for metric in METRIC_NAMES:
        assert len({v[metric] for v in ours.per_query.values()}) > 1, metric


@pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaTypeSafetyWarning")
def test_ranx_reads_tied_scores_in_list_order(tmp_path):
    from ranx import Qrels, Run, evaluate

    # 100 docs, the first 50 tied: ranx sorts by score with an unstable sort, so without the
    # strictly decreasing scores write_run writes, it would not keep the list order of the ties.
    rng = np.random.default_rng(0)
    docs = [f"d{i:03d}" for i in rng.permutation(100)]
    qrels = {"q": {docs[0]: 1, docs[49]: 2, docs[60]: 1}}
    run = {"q": [(d, 1.0 if i < 50 else 0.5) for i, d in enumerate(docs)]}
    write_qrels(tmp_path / "qrels.txt", qrels)
    write_run(tmp_path / "tied.run", run)

    ours = compute_metrics(
        read_run(tmp_path / "tied.run"),
        read_qrels(tmp_path / "qrels.txt"),
        metrics=["R@1", "MRR@10", "nDCG@10", "R@50", "P@50"],
    )
    assert ours.values["R@1"] == 1.0 and ours.values["P@50"] == pytest.approx(2 / 50)
    ranx_run = Run.from_file(str(tmp_path / "tied.run"), kind="trec")
    assert list(ranx_run.to_dict()["q"]) == docs
    theirs = evaluate(
        Qrels.from_file(str(tmp_path / "qrels.txt"), kind="trec"),
        ranx_run,
        [ranx_name(m) for m in ours.values],
    )
    assert list(ours.values.values()) == pytest.approx(list(theirs.values()), abs=1e-9)
