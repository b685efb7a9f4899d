"""The generated multi-domain suite: sites with confidential domain facts.

Each domain has facts the base model cannot know (made-up terms, and shared
abbreviations whose meaning is drawn per domain by seed), so the only way to answer is
to learn from the domain's sites. Design points:

- **ambiguous terms**: the same abbreviations appear in every domain with a different
  answer in each, so one adapter for all domains has to disambiguate by context;
- **domain from wording**: prompts carry no tag, only domain vocabulary (roles, places,
  documents) in shared templates;
- **held-out phrasing**: evaluation uses templates never used for training;
- **non-IID sites**: each site covers one sub-topic fully and a sample of the rest,
  with unequal sizes, so no single site knows its whole domain;
- **size skew at scale** (`size_skew` = σ > 0, for suites of hundreds of sites): each
  site's examples per fact are drawn from a lognormal of mean 1 (`train_per_fact` x
  exp(N(-σ²/2, σ²)), at least 1), so a few sites hold much of a domain's data and many
  hold little, as in cross-device federations; σ = 1 gives a largest/median site of
  about 5-10x at 500 sites a domain. Seeded like the rest: one seed, one suite.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from fedmoe.shared.data import write_jsonl
from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.synthetic_vocabulary import AMBIGUOUS_TERMS, DOMAINS, term_pool


TRAIN_TEMPLATES = (
    "The {role} at the {place} asked what {term} means. Answer:",
    "Question from a {role}: in the {document}, what is {term}? Answer:",
    "At the {place}, the {document} mentions {term}. What is it? Answer:",
    "A {role} here wants {term} explained, as used in the {place}. Answer:",
    "While reviewing the {document}, the {role} needed the meaning of {term}. Answer:",
    "What does {term} refer to for a {role} in the {place}? Answer:",
)
EVAL_TEMPLATES = (
    "A {role} in the {place} reads {term} in the {document}. Meaning? Answer:",
    "Tell the {role} what {term} means in this {place}. Answer:",
    "In the {document} from the {place}, the term {term} denotes what? Answer:",
)

SIZE_FACTORS = (0.75, 1.0, 1.25, 1.5)  # site train size = factor * train_per_fact per covered fact

@dataclass(frozen=True)
class Fact:
    domain: str
    term: str
    answer: str
    subtopic: int


def domain_facts(domains: list[str], seed: int, terms_per_domain: int = 12, subtopics: int = 2) -> dict[str, list[Fact]]:
    rng = random.Random(seed)
    pool = list(term_pool())
    rng.shuffle(pool)
    facts: dict[str, list[Fact]] = {}
    for d in domains:
        answers = list(DOMAINS[d].answers)
        rng.shuffle(answers)
        terms = list(AMBIGUOUS_TERMS) + [pool.pop() for _ in range(terms_per_domain)]
        facts[d] = [Fact(d, t, answers[i % len(answers)], i % subtopics) for i, t in enumerate(terms)]
    return facts


def render(fact: Fact, template: str, rng: random.Random) -> dict:
    v = DOMAINS[fact.domain]
    prompt = template.format(role=rng.choice(v.roles), place=rng.choice(v.places), document=rng.choice(v.documents), term=fact.term)
    return {"prompt": prompt, "completion": " " + fact.answer}


MAX_SIZE_SKEW = 3.0  # σ beyond this puts nearly all of a domain's data on one site


def site_size_factor(rng: random.Random, sigma: float) -> float:
    """A lognormal factor of mean 1 (μ = -σ²/2)."""
    return rng.lognormvariate(-sigma * sigma / 2, sigma)


def make_suite(out: str | Path, domains: int | list[str] = 4, sites: int = 8, seed: int = 0, train_per_fact: int = 8,
               eval_per_fact: int = 2, size_skew: float = 0.0) -> dict:
    """Write the suite; return a summary {sites: [...], domains: [...], mixed_eval: n}.
    `size_skew` > 0: lognormal site sizes (see the module docstring); 0: the four fixed
    size factors, drawn so that a domain's first sites differ."""
    names = list(DOMAINS)[:domains] if isinstance(domains, int) else list(domains)
    if isinstance(domains, int) and not 1 <= domains <= len(DOMAINS):
        raise FedmoeError(f"--domains must be between 1 and {len(DOMAINS)}, got {domains}")
    unknown = [d for d in names if d not in DOMAINS]
    if unknown:
        raise FedmoeError(f"unknown domain {unknown[0]!r}: known domains are {', '.join(DOMAINS)}")
    if sites < len(names):
        raise FedmoeError(f"--sites ({sites}) must be at least the number of domains ({len(names)})")
    if not 0.0 <= size_skew <= MAX_SIZE_SKEW:
        raise FedmoeError(f"--size-skew must be between 0 and {MAX_SIZE_SKEW:g} (lognormal sigma), got {size_skew}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    size_rng = random.Random(f"{seed}/site-sizes")  # its own stream: σ changes sizes, not which facts a site covers
    width = max(2, len(str(sites - 1)))  # site-00 .. site-99 as before; site-000 .. at 101+ sites, so names sort
    facts = domain_facts(names, seed)
    summary = {"domains": names, "sites": [], "seed": seed, "size_skew": size_skew}
    per_domain_index: dict[str, int] = {d: 0 for d in names}
    used_sizes: dict[str, set[float]] = {}
    for s in range(sites):
        domain = names[s % len(names)]
        k = per_domain_index[domain]
        per_domain_index[domain] += 1
        primary = k % 2
        own = [f for f in facts[domain] if f.subtopic == primary]
        others = [f for f in facts[domain] if f.subtopic != primary]
        covered = own + rng.sample(others, k=max(1, len(others) // 4))
        size_factor = rng.choice(SIZE_FACTORS)
        # Sites of one domain get unequal sizes while there are sizes left to give.
        taken = used_sizes.setdefault(domain, set())
        if size_factor in taken and len(taken) < len(SIZE_FACTORS):
            i = SIZE_FACTORS.index(size_factor)
            size_factor = next(f for f in SIZE_FACTORS[i:] + SIZE_FACTORS[:i] if f not in taken)
        taken.add(size_factor)
        if size_skew > 0:
            size_factor = site_size_factor(size_rng, size_skew)
        n_train = max(1, round(train_per_fact * size_factor))
        train, evals = [], []
        for f in covered:
            train += [render(f, TRAIN_TEMPLATES[rng.randrange(len(TRAIN_TEMPLATES))], rng) for _ in range(n_train)]
            evals += [render(f, EVAL_TEMPLATES[i % len(EVAL_TEMPLATES)], rng) for i in range(eval_per_fact)]
        rng.shuffle(train)
        site_dir = out / f"site-{s:0{width}d}"
        site_dir.mkdir(exist_ok=True)
        write_jsonl(site_dir / "train.jsonl", train)
        write_jsonl(site_dir / "eval.jsonl", evals)
        (site_dir / "site.toml").write_text(f'domain = "{domain}"\n')
        summary["sites"].append({"site": site_dir.name, "domain": domain, "train": len(train), "eval": len(evals)})
    mixed = []
    for d in names:
        for f in facts[d]:
            for i in range(eval_per_fact):
                mixed.append(render(f, EVAL_TEMPLATES[(i + 1) % len(EVAL_TEMPLATES)], rng) | {"domain": d})
    rng.shuffle(mixed)
    write_jsonl(out / "mixed-eval.jsonl", mixed)
    summary["mixed_eval"] = len(mixed)
    return summary
