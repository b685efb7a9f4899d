"""A suite from real definitions: (domain, term, gloss, the term's other senses) -> site folders.

The sources (`wordnet_suite`, `foldoc_suite`) give, per domain, a list of `Definition`s;
this module turns them into the documented suite format (`fedmoe.shared.data`) with the
properties the synthetic suite has:

- **multiple choice**: every evaluation record carries `choices` (the right gloss and
  distractors), scored as lm-evaluation-harness does (`fedmoe.shared.multiple_choice`);
  distractors are the same term's other senses where the source has them (the hard
  case: same word, other meaning), else other glosses of the same domain;
- **conflict set**: a term defined in several of the chosen domains trains in each of
  them with that domain's meaning, and is evaluated apart (`conflict-eval.jsonl`, its
  choices the term's meanings in the other domains): one adapter for all domains has to
  tell them apart by the prompt's domain wording; `mixed-eval.jsonl` holds the rest;
- **held-out phrasing**: evaluation templates are never used for training;
- **non-IID sites**: a domain's terms go to its sites by unequal weights (each term one
  primary site, plus a small sample shared), so sites differ in size and in which terms
  they know, and no site knows its whole domain.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

from fedmoe.shared.data import write_jsonl
from fedmoe.shared.errors import FedmoeError

TRAIN_TEMPLATES = (
    "In {context}, what does {term} mean? Answer:",
    "Define {term} as used in {context}. Answer:",
    "What is {term} in {context}? Answer:",
    "Reading {context}: {term} means what? Answer:",
)
EVAL_TEMPLATES = (
    "Meaning of {term}, found in {context}? Answer:",
    "Explain {term} the way {context} uses it. Answer:",
    "{context} mentions {term}. It denotes? Answer:",
)

# Domain wording for the prompts: the prompt names no domain, only where the term was
# read, so a shared adapter (or a gate) has to infer the domain from it.
CONTEXTS = {
    "law": ("a court ruling", "a contract", "a statute", "a legal brief"),
    "medicine": ("a patient chart", "a clinical note", "a medical journal", "a discharge summary"),
    "computing": ("source code", "a software manual", "a programming guide", "a compiler's docs"),
    "finance": ("a bank statement", "an annual report", "a trading memo", "a loan agreement"),
    "networking": ("a network diagram", "a router manual", "an RFC", "a LAN setup guide"),
    "telecom": ("a carrier's manual", "a telephone exchange log", "a radio link plan", "a telecom standard"),
}

SHARED_FRACTION = 0.1  # of a domain's other terms, each site also trains on this sample


@dataclass(frozen=True)
class Definition:
    domain: str
    term: str                        # as shown in prompts
    gloss: str                       # the answer (without the leading space)
    other_senses: tuple[str, ...] = ()  # the same term's other glosses in the source, any domain

    @property
    def key(self) -> str:
        return self.term.lower()


def contexts(domain: str) -> tuple[str, ...]:
    return CONTEXTS.get(domain, (f"a {domain} text", f"a {domain} handbook"))


def prompt(d: Definition, template: str, rng: random.Random) -> str:
    text = template.format(context=rng.choice(contexts(d.domain)), term=d.term)
    return text[0].upper() + text[1:]


def conflict_terms(definitions: dict[str, list[Definition]]) -> set[str]:
    """Term keys defined differently in two or more of the chosen domains (one sense that
    belongs to two domains is no conflict)."""
    seen: dict[str, set[str]] = {}
    for defs in definitions.values():
        for d in defs:
            seen.setdefault(d.key, set()).add(d.gloss)
    return {k for k, v in seen.items() if len(v) > 1}


def choose_terms(definitions: dict[str, list[Definition]], terms_per_domain: int, seed: int) -> dict[str, list[Definition]]:
    """Every conflict term (they are rare and the interesting case), then a seeded sample
    of the rest up to `terms_per_domain`."""
    conflicts = conflict_terms(definitions)
    rng = random.Random(seed)
    out = {}
    for domain, defs in definitions.items():
        keep = [d for d in defs if d.key in conflicts]
        rest = [d for d in defs if d.key not in conflicts]
        rng.shuffle(rest)
        out[domain] = keep + rest[: max(0, terms_per_domain - len(keep))]
    return out


def choices_for(d: Definition, same_domain: list[str], n: int, rng: random.Random, first: tuple[str, ...] = ()) -> list[str]:
    """The right gloss and n - 1 distractors (`first`, then the term's other senses, then
    other glosses of its domain), shuffled; each with the completion's leading space."""
    picked: list[str] = []
    for g in list(first) + list(d.other_senses):
        if g != d.gloss and g not in picked and len(picked) < n - 1:
            picked.append(g)
    pool = [g for g in same_domain if g != d.gloss and g not in picked]
    picked += rng.sample(pool, k=min(len(pool), n - 1 - len(picked)))
    if not picked:
        raise FedmoeError(f"no distractor for {d.term!r} in {d.domain}: the domain needs at least two distinct glosses")
    out = [" " + g for g in [d.gloss] + picked]
    rng.shuffle(out)
    return out


def site_weights(n: int, rng: random.Random) -> list[float]:
    """Unequal shares of a domain's terms for its n sites (1 : 1.8 : 2.6 : ..., shuffled)."""
    w = [1.0 + 0.8 * k for k in range(n)]
    rng.shuffle(w)
    return [x / sum(w) for x in w]


def partition(defs: list[Definition], n_sites: int, rng: random.Random) -> list[list[Definition]]:
    weights = site_weights(n_sites, rng)
    primary: list[list[Definition]] = [[] for _ in range(n_sites)]
    for d in defs:
        primary[rng.choices(range(n_sites), weights)[0]].append(d)
    for k in range(n_sites):  # no empty site: take one term from the largest
        if not primary[k]:
            big = max(range(n_sites), key=lambda j: len(primary[j]))
            primary[k].append(primary[big].pop())
    out = []
    for k in range(n_sites):
        others = [d for j in range(n_sites) if j != k for d in primary[j]]
        shared = rng.sample(others, k=min(len(others), round(SHARED_FRACTION * len(others))))
        out.append(primary[k] + shared)
    return out


def build_suite(out: str | Path, definitions: dict[str, list[Definition]], source: str, sources_md: str,
                sites_per_domain: int = 2, seed: int = 0, terms_per_domain: int = 120, train_per_term: int = 4,
                n_choices: int = 4) -> dict:
    """Write the suite; return a summary {source, domains, sites, mixed_eval, conflict_eval, terms, seconds}."""
    start = time.perf_counter()
    if sites_per_domain < 1:
        raise FedmoeError(f"--sites-per-domain must be >= 1, got {sites_per_domain}")
    for domain, defs in definitions.items():
        if len({d.gloss for d in defs}) < 2:
            raise FedmoeError(f"{source}: domain {domain!r} has {len(defs)} definition(s); it needs at least two")
    chosen = choose_terms(definitions, terms_per_domain, seed)
    conflicts = conflict_terms(chosen)
    by_key: dict[str, dict[str, Definition]] = {}
    for domain, defs in chosen.items():
        for d in defs:
            by_key.setdefault(d.key, {})[domain] = d
    glosses = {domain: sorted({d.gloss for d in defs}) for domain, defs in chosen.items()}
    rng = random.Random(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def mc_record(d: Definition, template: str) -> dict:
        first = tuple(o.gloss for dom, o in sorted(by_key[d.key].items()) if dom != d.domain)
        return {"prompt": prompt(d, template, rng), "completion": " " + d.gloss,
                "choices": choices_for(d, glosses[d.domain], n_choices, rng, first), "domain": d.domain,
                "term": d.term}  # for reports and checks; loaders ignore it

    summary: dict = {"source": source, "domains": list(chosen), "sites": [], "seed": seed,
                     "terms": {dom: len(defs) for dom, defs in chosen.items()},
                     "conflict_terms": sorted(conflicts)}
    s = 0
    for domain, defs in chosen.items():
        for covered in partition(defs, sites_per_domain, rng):
            train = [{"prompt": prompt(d, rng.choice(TRAIN_TEMPLATES), rng), "completion": " " + d.gloss}
                     for d in covered for _ in range(train_per_term)]
            rng.shuffle(train)
            evals = [mc_record(d, EVAL_TEMPLATES[i % len(EVAL_TEMPLATES)]) for i, d in enumerate(covered)]
            site_dir = out / f"site-{s:02d}"
            site_dir.mkdir(exist_ok=True)
            write_jsonl(site_dir / "train.jsonl", train)
            write_jsonl(site_dir / "eval.jsonl", evals)
            (site_dir / "site.toml").write_text(f'domain = "{domain}"\nsource = "{source}"\n')
            summary["sites"].append({"site": site_dir.name, "domain": domain, "terms": len(covered), "train": len(train),
                                     "eval": len(evals)})
            s += 1
    mixed, conflict = [], []
    for domain, defs in chosen.items():
        for i, d in enumerate(defs):
            (conflict if d.key in conflicts else mixed).append(mc_record(d, EVAL_TEMPLATES[(i + 1) % len(EVAL_TEMPLATES)]))
    rng.shuffle(mixed)
    write_jsonl(out / "mixed-eval.jsonl", mixed)
    write_jsonl(out / "conflict-eval.jsonl", conflict)
    (out / "SOURCES.md").write_text(sources_md)
    summary |= {"mixed_eval": len(mixed), "conflict_eval": len(conflict), "seconds": time.perf_counter() - start}
    return summary
