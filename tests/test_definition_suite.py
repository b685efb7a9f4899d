"""`fedmoe data make-suite --source wordnet|foldoc` on the installed Debian data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmoe.shared.cli import main
from fedmoe.shared.data import find_sites, load_mixed_eval, load_site, read_jsonl
from fedmoe.shared.errors import FedmoeError
from fedmoe.simulations.definition_suite import EVAL_TEMPLATES, TRAIN_TEMPLATES
from fedmoe.simulations.foldoc_suite import DEFAULT_DIR as FOLDOC_DIR, make_foldoc_suite
from fedmoe.simulations.wordnet_suite import DEFAULT_DIR as WORDNET_DIR, make_wordnet_suite

needs_wordnet = pytest.mark.skipif(not Path(WORDNET_DIR, "data.noun").exists(), reason="wordnet-base not installed")
needs_foldoc = pytest.mark.skipif(not Path(FOLDOC_DIR, "foldoc.dict.dz").exists(), reason="dict-foldoc not installed")

WORDNET_DOMAINS = ["law", "medicine", "computing", "finance"]
FOLDOC_DOMAINS = ["computing", "networking", "telecom"]


@pytest.fixture(scope="module", params=[pytest.param("wordnet", marks=needs_wordnet), pytest.param("foldoc", marks=needs_foldoc)])
def suite(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    if request.param == "wordnet":
        summary = make_wordnet_suite(out, WORDNET_DOMAINS, sites_per_domain=3, seed=1, terms_per_domain=60)
    else:
        summary = make_foldoc_suite(out, FOLDOC_DOMAINS, sites_per_domain=3, seed=1, terms_per_domain=60)
    return out, summary


def test_sites_in_the_documented_format_cover_the_domains(suite):
    out, summary = suite
    sites = [load_site(p) for p in find_sites(out)]
    assert {s.domain for s in sites} == set(summary["domains"])
    assert all(len(s.train) and len(s.eval) for s in sites)
    assert all(r.choices and r.completion in r.choices for s in sites for r in s.eval)
    mixed = load_mixed_eval(out)
    assert {r.domain for r in mixed} == set(summary["domains"])
    assert all(len(r.choices) == 4 and len(set(r.choices)) == 4 for r in mixed)


def test_sites_are_non_iid(suite):
    out, summary = suite
    for domain in summary["domains"]:
        sites = [load_site(p) for p in find_sites(out)]
        mine = [s for s in sites if s.domain == domain]
        sizes = [len(s.train) for s in mine]
        assert len(set(sizes)) > 1, f"{domain}: equal site sizes {sizes}"
        terms = [{r.completion for r in s.train} for s in mine]
        union = set().union(*terms)
        assert all(t < union for t in terms), f"{domain}: a site knows its whole domain"


def test_conflict_set_is_separate_and_hard(suite):
    out, summary = suite
    conflict = read_jsonl(out / "conflict-eval.jsonl") if summary["conflict_eval"] else []
    assert len(conflict) == summary["conflict_eval"] >= 2 * len(summary["conflict_terms"]) > 0
    terms = lambda name: {json.loads(line)["term"].lower() for line in (out / name).read_text().splitlines()}  # noqa: E731
    assert not terms("conflict-eval.jsonl") & terms("mixed-eval.jsonl")
    assert terms("conflict-eval.jsonl") == set(summary["conflict_terms"])
    # every conflict record offers another domain's meaning of the same term as a distractor
    glosses = {(r.domain, r.completion) for r in conflict}
    for r in conflict:
        others = {c for c in r.choices if c != r.completion}
        assert any((d, c) in glosses for d in summary["domains"] if d != r.domain for c in others)


def test_eval_phrasings_are_unseen_in_training(suite):
    out, _ = suite
    train_prompts = {r.prompt for p in find_sites(out) for r in load_site(p).train}
    eval_prompts = {r.prompt for p in find_sites(out) for r in load_site(p).eval} | {r.prompt for r in load_mixed_eval(out)}
    assert not train_prompts & eval_prompts
    stems = lambda templates: {t.split("{")[0] + t.split("}")[-1] for t in templates}  # noqa: E731
    assert not stems(TRAIN_TEMPLATES) & stems(EVAL_TEMPLATES)


def test_sources_name_the_licence(suite):
    out, summary = suite
    text = (out / "SOURCES.md").read_text()
    if summary["source"] == "wordnet":
        assert "WordNet 3.0" in text and "Princeton University" in text and "Copyright" in text
    else:
        assert "FOLDOC" in text and "GNU Free Documentation License" in text and "Denis Howe" in text


def test_make_suite_cli(tmp_path, capsys):
    if not Path(WORDNET_DIR, "data.noun").exists():
        pytest.skip("wordnet-base not installed")
    assert main(["data", "make-suite", "--source", "wordnet", "--domains", "law,finance", "--sites-per-domain", "2",
                 "--terms-per-domain", "30", "--out", str(tmp_path / "s"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["domains"] == ["law", "finance"] and len(summary["sites"]) == 4
    assert (tmp_path / "s" / "conflict-eval.jsonl").exists()


@pytest.mark.parametrize("make, package, env", [(make_wordnet_suite, "wordnet-base", "FEDMOE_WORDNET_DIR"),
                                                (make_foldoc_suite, "dict-foldoc", "FEDMOE_FOLDOC_DIR")])
def test_missing_data_is_one_line_naming_the_package(make, package, env, tmp_path, monkeypatch):
    monkeypatch.setenv(env, str(tmp_path / "nowhere"))
    with pytest.raises(FedmoeError) as err:
        make(tmp_path / "out", ["computing"])
    assert f"apt-get install {package}" in str(err.value) and "\n" not in str(err.value)
    assert str(tmp_path / "nowhere") in str(err.value)


def test_unknown_domain_is_an_error(tmp_path):
    with pytest.raises(FedmoeError, match="unknown domain 'astrology'"):
        make_foldoc_suite(tmp_path, ["astrology"])
