"""Which metric a report's methods are scored by (`fedmoe.simulations.method_scores`):
multiple-choice acc_norm, with the conflict set, when the eval records carry choices
(a WordNet suite); exact match as before when they do not (the synthetic suite)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmoe.shared.data import load_conflict_eval, load_mixed_eval
from fedmoe.simulations.method_scores import domain_scores, headline_metric, mean_scores, method_entry, with_conflict
from fedmoe.simulations.wordnet_suite import DEFAULT_DIR as WORDNET_DIR, make_wordnet_suite

needs_wordnet = pytest.mark.skipif(not Path(WORDNET_DIR, "data.noun").exists(), reason="wordnet-base not installed")


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    from fedmoe.shared.modeling import load_base_model, load_tokenizer

    return load_base_model(tiny_model_dir, "none", "cpu"), load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def wordnet_suite(tmp_path_factory):
    if not Path(WORDNET_DIR, "data.noun").exists():
        pytest.skip("wordnet-base not installed")
    out = tmp_path_factory.mktemp("wn")
    # law, computing, finance share "client": a conflict set even with 4 terms a domain.
    make_wordnet_suite(out, ["law", "computing", "finance"], sites_per_domain=1, seed=0, terms_per_domain=4)
    return out


@needs_wordnet
def test_choices_make_acc_norm_the_headline_and_score_the_conflict_set(tiny_lm, wordnet_suite):
    from fedmoe.shared.multiple_choice import score_records
    from fedmoe.shared.training import evaluate

    model, tokenizer = tiny_lm
    mixed, conflict = load_mixed_eval(wordnet_suite), load_conflict_eval(wordnet_suite)
    assert conflict and all(r.choices for r in mixed + conflict)
    assert headline_metric(mixed) == "acc_norm"
    scores = with_conflict(domain_scores(model, tokenizer, mixed), domain_scores(model, tokenizer, conflict))
    entry = method_entry(scores, "acc_norm")

    mc, em = score_records(model, tokenizer, mixed), evaluate(model, tokenizer, mixed)
    assert entry["per_domain"] == {d: v["acc_norm"] for d, v in mc.per_domain.items()}
    assert entry["mixed"] == pytest.approx(mc.acc_norm)
    assert entry["acc"] == pytest.approx(mc.acc)
    assert entry["exact_match"] == pytest.approx(em.accuracy) and entry["loss"] == pytest.approx(em.loss)
    assert entry["conflict"] == pytest.approx(score_records(model, tokenizer, conflict).acc_norm)
    assert set(entry["conflict_per_domain"]) <= set(entry["per_domain"])


def test_no_choices_keep_exact_match_and_no_conflict_field(tiny_lm, suite_dir):
    from fedmoe.shared.training import evaluate

    model, tokenizer = tiny_lm
    mixed = load_mixed_eval(suite_dir)[:48]
    assert load_conflict_eval(suite_dir) == [] and headline_metric(mixed) == "exact_match"
    entry = method_entry(with_conflict(domain_scores(model, tokenizer, mixed), {}), "exact_match")
    result = evaluate(model, tokenizer, mixed)
    assert entry["per_domain"] == {d: v["accuracy"] for d, v in result.per_domain.items()}
    assert entry["mixed"] == pytest.approx(result.accuracy)
    assert set(entry) == {"per_domain", "mixed", "loss"}  # no acc / acc_norm / conflict without choices


def test_headline_needs_choices_on_every_record():
    from fedmoe.shared.data import Record

    mc = Record("p", " a", "law", (" a", " b"))
    assert headline_metric([mc, mc]) == "acc_norm"
    assert headline_metric([mc, Record("p", " a", "law")]) == "exact_match"
    assert headline_metric([]) == "exact_match"


def test_local_only_means_over_a_domains_sites():
    a = {"acc_norm": 0.5, "exact_match": 0.0, "loss": 2.0, "count": 4, "conflict": {"acc_norm": 1.0, "count": 2}}
    b = {"acc_norm": 0.25, "exact_match": 0.5, "loss": 4.0, "count": 4, "conflict": {"acc_norm": 0.0, "count": 2}}
    mean = mean_scores([a, b])
    assert mean == {"acc_norm": 0.375, "exact_match": 0.25, "loss": 3.0, "count": 4,
                    "conflict": {"acc_norm": 0.5, "count": 2}}
    entry = method_entry({"law": mean, "finance": {"acc_norm": 1.0, "exact_match": 1.0, "loss": 1.0, "count": 12}},
                         "acc_norm")
    assert entry["mixed"] == pytest.approx((0.375 * 4 + 12) / 16)  # weighted by records
    assert entry["conflict"] == 0.5 and entry["conflict_per_domain"] == {"law": 0.5}


def test_report_table_shows_conflict_and_exact_match_beside_acc_norm():
    from fedmoe.simulations.simulate import report_table

    entry = {"per_domain": {"law": 0.5}, "mixed": 0.5, "exact_match": 0.1, "conflict": 0.25}
    table = report_table({"domains": ["law"], "metric": "acc_norm", "methods": {"base": entry}})
    assert table.splitlines()[0] == "| method | law | mixed | conflict | exact match |"
    assert table.splitlines()[2] == "| base | 0.500 | **0.500** | 0.250 | 0.100 |"
    synthetic = report_table({"domains": ["law"], "metric": "exact_match",
                              "methods": {"base": {"per_domain": {"law": 0.5}, "mixed": 0.5, "loss": 1.0}}})
    assert synthetic.splitlines()[0] == "| method | law | mixed |"  # as before choices existed


def test_real_preset_is_smollm2_on_a_wordnet_suite():
    from fedmoe.simulations.presets import PRESETS, with_overrides

    real = PRESETS["real"]
    assert real.model == "smollm2-135m" and real.quant == "nf4" and real.suite == "wordnet"
    assert real.domains == 4 and real.sites_per_domain == 2
    assert with_overrides(real, {"sites_per_domain": 1}).sites == 4


@needs_wordnet
def test_real_preset_suite_is_built_once_into_the_cache(monkeypatch, tmp_path):
    from dataclasses import replace

    from fedmoe.simulations.presets import PRESETS
    from fedmoe.simulations.simulate import prepare_suite

    monkeypatch.setenv("FEDMOE_HOME", str(tmp_path))
    preset = replace(PRESETS["real"], terms_per_domain=4)
    path = prepare_suite(preset, None)
    assert path.parent == tmp_path / "suites" and (path / "conflict-eval.jsonl").exists()
    assert sorted({r.domain for r in load_mixed_eval(path)}) == ["computing", "finance", "law", "medicine"]
    assert len(list(path.glob("site-*"))) == preset.sites
    stamp = (path / "mixed-eval.jsonl").stat().st_mtime_ns
    assert prepare_suite(preset, None) == path and (path / "mixed-eval.jsonl").stat().st_mtime_ns == stamp


def test_local_only_ceiling_is_the_share_of_its_domains_answers_a_site_holds():
    from fedmoe.shared.data import Record, Site
    from fedmoe.simulations.baselines import local_only_ceiling
    from fedmoe.simulations.simulate import trained_text

    def site(domain, answers):
        return Site(Path(f"/x/{domain}-{len(answers)}"), domain, [Record(f"q {a}?", f" {a}") for a in answers], [])

    mixed = [Record(f"new phrasing of {a}", f" {a}", domain=d)
             for d, answers in (("law", "abcd"), ("medicine", "wxyz")) for a in answers]
    sites = [site("law", "ab"), site("law", "abc"), site("medicine", "w"), site("medicine", "q")]
    ceiling = local_only_ceiling(sites, mixed)
    assert ceiling["per_domain"] == {"law": pytest.approx((2 / 4 + 3 / 4) / 2), "medicine": pytest.approx(1 / 8)}
    assert ceiling["mixed"] == pytest.approx((0.625 * 4 + 0.125 * 4) / 8)
    text = trained_text({"trained": {"steps": 8, "rank": "each site's own", "data": "one site's own data",
                                     "ceiling": ceiling}})
    assert text.endswith("(its data holds 38% of its domain's eval answers)")
