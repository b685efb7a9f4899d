"""Foundation: the site data format and the generated domain suite."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import pytest

from fedmoe.shared.data import Record, find_sites, load_mixed_eval, load_site, read_jsonl
from fedmoe.shared.errors import FedmoeError
from fedmoe.simulations.domain_suite import (
    AMBIGUOUS_TERMS,
    DOMAINS,
    EVAL_TEMPLATES,
    TRAIN_TEMPLATES,
    make_suite,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def site(root: Path, train: str, toml: str = 'domain = "law"\n', evals: str | None = None) -> Path:
    write(root / "train.jsonl", train)
    write(root / "site.toml", toml)
    if evals is not None:
        write(root / "eval.jsonl", evals)
    return root


PC = json.dumps({"prompt": "Q? Answer:", "completion": " yes"})


# -- the record format ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_line, needle",
    [
        ('{"prompt": "a", "completion": ', "malformed JSON"),
        ("[1, 2, 3]", "expected a JSON object"),
        ('{"prompt": "a"}', "'prompt' and 'completion'"),
        ('{"prompt": "a", "completion": "   "}', "empty 'completion'"),
        ('{"question": "a", "answer": "b"}', "needs 'prompt' and 'completion', or 'text'"),
        ('{"text": ""}', "'text' must be a non-empty string"),
        ('{"prompt": "a", "completion": "b", "domain": 3}', "'domain' must be a string"),
    ],
)
def test_bad_record_names_file_and_line(tmp_path, bad_line, needle):
    path = write(tmp_path / "train.jsonl", f"{PC}\n\n{PC}\n{bad_line}\n{PC}\n")
    with pytest.raises(FedmoeError) as exc:
        read_jsonl(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}:4: "), msg  # the blank line 2 still counts
    assert needle in msg and "\n" not in msg


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FedmoeError, match="data file not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(FedmoeError, match="no records"):
        read_jsonl(write(tmp_path / "empty.jsonl", "\n\n"))


def test_text_records_are_accepted(tmp_path, tiny_model_dir):
    from fedmoe.shared.modeling import load_tokenizer
    from fedmoe.shared.training import encode_record

    s = site(tmp_path / "s", json.dumps({"text": "The farmer saw the apple at the market."}) + "\n" + PC + "\n")
    loaded = load_site(s)
    text, pc = loaded.train
    assert text.is_text and text.prompt == "" and text.completion.startswith("The farmer")
    assert not pc.is_text
    assert text.domain == pc.domain == "law"  # records inherit the site's domain
    tok = load_tokenizer(tiny_model_dir)
    ids, labels = encode_record(tok, text, 128)
    assert ids == labels and ids[-1] == tok.eos_token_id  # text trains on every token
    ids, labels = encode_record(tok, pc, 128)
    n_prompt = len(tok(pc.prompt, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]


def test_site_folder_errors(tmp_path):
    with pytest.raises(FedmoeError, match="site data folder not found"):
        load_site(tmp_path / "absent")
    (tmp_path / "no-toml").mkdir()
    write(tmp_path / "no-toml" / "train.jsonl", PC + "\n")
    with pytest.raises(FedmoeError, match="has no site.toml"):
        load_site(tmp_path / "no-toml")
    s = site(tmp_path / "no-domain", PC + "\n", toml='region = "eu"\n')
    with pytest.raises(FedmoeError) as exc:
        load_site(s)
    assert "site.toml" in str(exc.value) and "domain" in str(exc.value)
    s = site(tmp_path / "bad-toml", PC + "\n", toml="domain = \n")
    with pytest.raises(FedmoeError, match="site.toml"):
        load_site(s)
    s = site(tmp_path / "no-train", PC + "\n")
    (s / "train.jsonl").unlink()
    with pytest.raises(FedmoeError, match="train.jsonl"):
        load_site(s)
    s = site(tmp_path / "ok", PC + "\n", evals=PC + "\n")
    with pytest.raises(FedmoeError, match="'medicine' was given"):
        load_site(s, domain="medicine")
    assert load_site(s, domain="law").eval == [Record("Q? Answer:", " yes", "law")]
    with pytest.raises(FedmoeError, match="suite folder not found"):
        find_sites(tmp_path / "absent")
    with pytest.raises(FedmoeError, match="no site folders"):
        find_sites(tmp_path / "no-toml")


def test_mixed_eval_needs_domains(tmp_path):
    write(tmp_path / "mixed-eval.jsonl", json.dumps({"prompt": "a", "completion": "b", "domain": "law"}) + "\n" + PC + "\n")
    with pytest.raises(FedmoeError, match="mixed-eval.jsonl:2: record has no 'domain'"):
        load_mixed_eval(tmp_path)


# -- the generated suite ---------------------------------------------------------------------


def suite_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_make_suite_is_deterministic_by_seed(tmp_path):
    a = make_suite(tmp_path / "a", domains=3, sites=6, seed=7)
    b = make_suite(tmp_path / "b", domains=3, sites=6, seed=7)
    c = make_suite(tmp_path / "c", domains=3, sites=6, seed=8)
    fa, fb, fc = suite_files(tmp_path / "a"), suite_files(tmp_path / "b"), suite_files(tmp_path / "c")
    assert a == b and fa == fb
    assert len(fa) == 6 * 3 + 1
    assert set(fa) == set(fc)
    assert all(fa[name] != fc[name] for name in fa if name.endswith(".jsonl"))


def test_make_suite_rejects_bad_arguments(tmp_path):
    with pytest.raises(FedmoeError, match="--domains"):
        make_suite(tmp_path / "x", domains=len(DOMAINS) + 1)
    with pytest.raises(FedmoeError, match="--sites"):
        make_suite(tmp_path / "x", domains=4, sites=3)
    with pytest.raises(FedmoeError, match="unknown domain 'cooking'"):
        make_suite(tmp_path / "x", domains=["law", "cooking"])


@pytest.fixture(scope="module")
def suite(suite_dir):
    sites = [load_site(p) for p in find_sites(suite_dir)]
    return sites, load_mixed_eval(suite_dir)


def term_in(prompt: str, term: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(term)}(?![\w-])", prompt) is not None


def test_suite_layout(suite_dir, suite):
    sites, mixed = suite
    assert len(sites) == 8
    domains = [s.domain for s in sites]
    assert sorted(set(domains)) == sorted(["medicine", "law", "finance", "telecom"])
    assert all(domains.count(d) == 2 for d in set(domains))
    assert all(s.train and s.eval for s in sites)
    assert {r.domain for r in mixed} == set(domains)
    assert all(r.completion.startswith(" ") and not r.is_text for s in sites for r in s.train + s.eval)


def test_ambiguous_terms_in_every_domain_with_different_answers(suite):
    sites, mixed = suite
    answers: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for s in sites:
        for r in s.train + s.eval:
            for term in AMBIGUOUS_TERMS:
                if term_in(r.prompt, term):
                    answers[term][s.domain].add(r.completion)
    domains = {s.domain for s in sites}
    for term in AMBIGUOUS_TERMS:
        assert set(answers[term]) == domains, f"{term} is missing from some domain"
        for d, got in answers[term].items():
            assert len(got) == 1, f"{term} has several answers in {d}: {got}"  # one meaning per domain
        meanings = [next(iter(got)) for got in answers[term].values()]
        assert len(set(meanings)) == len(meanings), f"{term} means the same in two domains"
    # mixed-eval asks the ambiguous terms too, with the domain's own answer
    for r in mixed:
        for term in AMBIGUOUS_TERMS:
            if term_in(r.prompt, term):
                assert {r.completion} == answers[term][r.domain]


def template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for slot in ("role", "place", "document", "term"):
        pattern = pattern.replace(re.escape("{" + slot + "}"), ".+?")
    return re.compile(pattern + r"\Z")


def test_eval_prompts_are_never_training_prompts(suite):
    sites, mixed = suite
    train_prompts = {r.prompt for s in sites for r in s.train}
    eval_prompts = {r.prompt for s in sites for r in s.eval} | {r.prompt for r in mixed}
    assert train_prompts and eval_prompts
    assert not train_prompts & eval_prompts
    # held-out phrasing: eval prompts come from evaluation-only templates, and back
    train_res, eval_res = [template_regex(t) for t in TRAIN_TEMPLATES], [template_regex(t) for t in EVAL_TEMPLATES]
    for p in eval_prompts:
        assert any(r.match(p) for r in eval_res) and not any(r.match(p) for r in train_res), p
    for p in train_prompts:
        assert any(r.match(p) for r in train_res) and not any(r.match(p) for r in eval_res), p


def test_prompts_carry_no_domain_tag(suite):
    """The domain is revealed by wording only. A domain name may occur inside that
    domain's own vocabulary ("law firm" is a place), never on its own as a tag."""
    sites, mixed = suite
    assert not any("{domain}" in t for t in TRAIN_TEMPLATES + EVAL_TEMPLATES)
    for r in [r for s in sites for r in s.train + s.eval] + mixed:
        v = DOMAINS[r.domain]
        stripped = r.prompt.lower()
        for phrase in sorted(v.roles + v.places + v.documents, key=len, reverse=True):
            stripped = stripped.replace(phrase, " ")
        for name in DOMAINS:
            assert not re.search(rf"\b{name}\b", stripped), (name, r.prompt)
        assert r.domain not in r.completion


def test_prompts_use_their_own_domain_vocabulary(suite):
    sites, _ = suite
    for s in sites:
        v = DOMAINS[s.domain]
        own = v.roles + v.places + v.documents
        for r in s.train[:50]:
            assert any(w in r.prompt for w in own), r.prompt


def test_sites_of_a_domain_differ_in_coverage_and_size(suite):
    from fedmoe.simulations.domain_suite import term_pool

    known = set(term_pool()) | set(AMBIGUOUS_TERMS)
    sites, _ = suite
    by_domain = defaultdict(list)
    for s in sites:
        terms = set()
        for r in s.train:
            found = {w for w in re.findall(r"[\w-]+", r.prompt) if w in known}
            assert len(found) == 1, r.prompt
            terms |= found
        by_domain[s.domain].append((s, frozenset(terms)))
    for domain, group in by_domain.items():
        sizes = [len(s.train) for s, _ in group]
        assert len(set(sizes)) == len(sizes), f"{domain} sites have equal sizes {sizes}"
        coverages = [terms for _, terms in group]
        assert len(set(coverages)) == len(coverages), f"{domain} sites cover the same terms"
        union = frozenset().union(*coverages)
        assert set(AMBIGUOUS_TERMS) <= union
        assert all(cov < union for cov in coverages), f"one {domain} site knows the whole domain"
