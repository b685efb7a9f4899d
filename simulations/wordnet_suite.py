"""Domain definitions from WordNet 3.0 (Debian `wordnet-base`), for `fedmoe data make-suite --source wordnet`.

WordNet's data files are one synset a line: `offset lex_filenum ss_type w_cnt word lex_id
... p_cnt [symbol offset pos source/target]... | gloss`. A synset's topic domain is its
`;c` pointer (to e.g. `law, jurisprudence`); a domain here is a set of such domain synsets
plus their hyponym trees (`~` pointers: `criminal_law` under `law`), and its terms are the
noun synsets that point into that set. Senses come in frequency order from `index.noun`,
so a term's gloss in a domain is its most frequent sense there, and its other senses
(any domain, or none) are the hard distractors.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from fedmoe.shared.errors import FedmoeError
from fedmoe.simulations.definition_suite import Definition, build_suite

DEFAULT_DIR = "/usr/share/wordnet"
ENV_DIR = "FEDMOE_WORDNET_DIR"

# domain -> WordNet 3.0 domain synsets (noun offsets) whose `;c` members are its terms;
# each synset's hyponym tree counts too. Counts: direct `;c` members in WordNet 3.0.
DOMAIN_SYNSETS: dict[str, dict[str, str]] = {
    "law": {"08441203": "law, jurisprudence (598)", "00611143": "law, practice_of_law (2)",
            "00766234": "crime, offense (29)", "06535222": "legislation, statute_law (3)",
            "08163273": "legislature (4)"},
    "medicine": {"06043075": "medicine, medical_specialty (75)", "00612160": "medicine, practice_of_medicine (38)",
                 "06060845": "pathology (30)", "06055946": "psychiatry (28)", "06063588": "surgery (15)",
                 "00671351": "operation, surgical_procedure (6)", "06047430": "dentistry (11)",
                 "06054892": "pharmacology (5)", "03740161": "medicine, medication (2)"},
    "computing": {"06128570": "computer_science, computing (205)", "03082979": "computer, data_processor (21)",
                  "00928947": "programming (4)", "00950705": "computer_technology (1)"},
    "finance": {"06150633": "finance (7)", "01134037": "finance (activity)", "01090446": "commerce (47)",
                "01094725": "commercial_enterprise, business (22)", "06149484": "economics (21)",
                "13308999": "tax, taxation (13)", "04323026": "stock_exchange (11)", "05662532": "accounting (9)",
                "00618734": "accountancy (1)", "01100658": "banking (1)", "01100273": "banking (1)"},
    "telecom": {"06271778": "telecommunication, telecom (12)", "06128307": "telecommunication (0)"},
}
# Topic pointers alone give some domains few terms (medicine, finance): these hyponym
# trees add the domain's own kinds of things (diseases, drugs; loans, payments, funds).
MEMBER_TREES: dict[str, dict[str, str]] = {
    "medicine": {"14070360": "disease", "14299637": "symptom", "03247620": "drug", "01024392": "medical_procedure",
                 "00658082": "treatment", "14174549": "infection", "04364545": "surgical_instrument"},
    "finance": {"13398953": "loan", "13278375": "payment", "08054721": "financial_institution", "13359690": "bank_account",
                "13254985": "financial_gain", "13308999": "tax", "13333237": "investment", "13358549": "fund",
                "13384557": "money", "13318584": "interest"},
    "computing": {"06566077": "software", "06898352": "programming_language", "05728493": "data_structure",
                  "05847438": "algorithm"},
}
DEFAULT_DOMAINS = ("law", "medicine", "computing", "finance")  # make-suite's and the `real` preset's
MEMBER_DEPTH = 2
HYPONYM_DEPTH = 3  # the domain trees are shallow; deeper only adds unrelated leaves
MAX_GLOSS_CHARS = 72  # the default model sees 128 positions: prompt + gloss must fit


def data_dir(path: str | Path | None = None) -> Path:
    path = Path(path or os.environ.get(ENV_DIR) or DEFAULT_DIR)
    if not (path / "data.noun").is_file() or not (path / "index.noun").is_file():
        raise FedmoeError(f"WordNet data not found in {path} (data.noun, index.noun): apt-get install wordnet-base, "
                          f"or set {ENV_DIR}")
    return path


_PAREN_TAG = re.compile(r"^\s*\([^)]*\)\s*")


def clean_gloss(gloss: str) -> str:
    """The definition alone: no examples (quoted), only its first clause, no leading
    usage tag such as "(law)" (it would name the domain in the answer)."""
    text = gloss.split('"')[0].split(";")[0].strip()
    return _PAREN_TAG.sub("", text).strip().rstrip(":,")


def read_synsets(path: Path) -> dict[str, tuple[list[str], list[tuple[str, str]], str]]:
    """offset -> (lemmas, [(pointer symbol, target offset)] to nouns, gloss)."""
    synsets = {}
    with open(path / "data.noun", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):  # the licence header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            n_words = int(fields[3], 16)
            lemmas = [fields[4 + 2 * i] for i in range(n_words)]
            i = 4 + 2 * n_words
            n_ptrs = int(fields[i])
            ptrs = [(fields[i + 1 + 4 * k], fields[i + 2 + 4 * k]) for k in range(n_ptrs) if fields[i + 3 + 4 * k] == "n"]
            synsets[fields[0]] = (lemmas, ptrs, clean_gloss(gloss))
    return synsets


def read_senses(path: Path) -> dict[str, list[str]]:
    """lemma (lowercase) -> its noun synset offsets, most frequent sense first."""
    senses = {}
    with open(path / "index.noun", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):
                continue
            fields = line.split()
            n = int(fields[2])
            senses[fields[0]] = fields[-n:]
    return senses


def domain_closure(synsets, roots: list[str], depth: int = HYPONYM_DEPTH) -> set[str]:
    seen, frontier = set(roots), list(roots)
    for _ in range(depth):
        frontier = [t for o in frontier for sym, t in synsets.get(o, ([], [], ""))[1] if sym == "~" and t not in seen]
        seen.update(frontier)
    return seen


def term_name(lemma: str) -> str:
    return re.sub(r"\(\w+\)$", "", lemma).replace("_", " ")


def wordnet_definitions(domains: list[str], path: str | Path | None = None) -> dict[str, list[Definition]]:
    unknown = [d for d in domains if d not in DOMAIN_SYNSETS]
    if unknown:
        raise FedmoeError(f"wordnet: unknown domain {unknown[0]!r}: known domains are {', '.join(DOMAIN_SYNSETS)}")
    root = data_dir(path)
    synsets, senses = read_synsets(root), read_senses(root)
    out: dict[str, list[Definition]] = {}
    for domain in domains:
        closure = domain_closure(synsets, list(DOMAIN_SYNSETS[domain]))
        members = {o for o, (_, ptrs, _) in synsets.items() if any(sym == ";c" and t in closure for sym, t in ptrs)}
        members |= domain_closure(synsets, list(MEMBER_TREES.get(domain, {})), MEMBER_DEPTH) - set(MEMBER_TREES.get(domain, {}))
        defs: dict[str, Definition] = {}
        for offset in sorted(members):
            for lemma in synsets[offset][0]:
                key = term_name(lemma).lower()
                if key in defs:
                    continue
                order = senses.get(key.replace(" ", "_"), [offset])
                mine = next((o for o in order if o in members), offset)  # its most frequent sense in this domain
                gloss = synsets[mine][2]
                if not gloss or len(gloss) > MAX_GLOSS_CHARS:
                    continue
                others = tuple(g for o in order if o != mine and (g := synsets.get(o, ([], [], ""))[2])
                               and len(g) <= MAX_GLOSS_CHARS)
                defs[key] = Definition(domain, term_name(lemma), gloss, others)
        out[domain] = sorted(defs.values(), key=lambda d: d.key)
    return out


def sources_md(path: Path) -> str:
    licence = [line[line.index(" ", 2) + 1:].rstrip() for line in open(path / "data.noun", encoding="utf-8", errors="replace")
               if line.startswith("  ")]
    return "\n".join([
        "# Sources", "",
        "Terms and glosses: **WordNet 3.0** (Princeton University), read from the Debian package",
        f"`wordnet-base` ({path}). Domain membership follows WordNet's topic-domain (`;c`) pointers;",
        "glosses are cut to their first clause. WordNet is distributed under the WordNet 3.0",
        "licence, reproduced below as it appears in the data files; it requires the copyright",
        "notice to appear on all copies, including modifications.", "",
        "Citation: Princeton University, \"About WordNet.\" WordNet. Princeton University. 2010.",
        "George A. Miller (1995). WordNet: A Lexical Database for English. CACM 38(11): 39-41.", "",
        "```", *[line.strip() for line in licence], "```", "",
    ])


def make_wordnet_suite(out: str | Path, domains: list[str], sites_per_domain: int = 2, seed: int = 0,
                       path: str | Path | None = None, **options) -> dict:
    root = data_dir(path)
    return build_suite(out, wordnet_definitions(domains, root), "wordnet", sources_md(root), sites_per_domain, seed, **options)
