"""The words of the generated domain suite: per-domain vocabulary, shared ambiguous
abbreviations and made-up terms. The tiny base model is pretrained on exactly these words
(fedmoe.shared.pretrain), and the suite (fedmoe.simulations.domain_suite) draws from them,
so both read this one list."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class DomainVocab:
    roles: tuple[str, ...]
    places: tuple[str, ...]
    documents: tuple[str, ...]
    answers: tuple[str, ...]


DOMAINS: dict[str, DomainVocab] = {
    "medicine": DomainVocab(
        ("physician", "nurse", "cardiologist", "surgeon", "pharmacist", "radiologist"),
        ("clinic", "ward", "hospital", "emergency room", "pharmacy", "operating theatre"),
        ("patient chart", "discharge note", "prescription", "lab report", "scan request"),
        ("stent", "embolism", "insulin", "biopsy", "sepsis", "angina", "dialysis", "anemia", "catheter",
         "fracture", "vaccine", "antibiotic", "tumor", "suture", "plasma", "artery", "kidney", "ulcer",
         "asthma", "migraine", "infusion", "tremor", "lesion", "thyroid"),
    ),
    "law": DomainVocab(
        ("attorney", "judge", "paralegal", "prosecutor", "notary", "barrister"),
        ("court", "law firm", "tribunal", "chambers", "registry office", "appeals court"),
        ("contract", "affidavit", "court filing", "statute", "deed", "ruling"),
        ("injunction", "tort", "estoppel", "subpoena", "verdict", "easement", "probate", "lien", "indemnity",
         "custody", "plea", "bail", "waiver", "covenant", "arbitration", "liability", "patent", "damages",
         "warrant", "testimony", "escrow", "felony", "appeal", "trust"),
    ),
    "finance": DomainVocab(
        ("banker", "trader", "auditor", "analyst", "fund manager", "accountant"),
        ("bank", "trading floor", "brokerage", "treasury desk", "stock exchange", "credit union"),
        ("ledger", "balance sheet", "prospectus", "loan agreement", "audit report", "portfolio"),
        ("dividend", "bond", "equity", "hedge", "margin", "coupon", "yield", "collateral", "leverage",
         "annuity", "futures", "liquidity", "mortgage", "swap", "inflation", "budget", "deposit", "credit",
         "option", "tariff", "pension", "rebate", "ledger", "forex"),
    ),
    "telecom": DomainVocab(
        ("network engineer", "field technician", "radio planner", "operator", "carrier analyst", "installer"),
        ("network operations centre", "base station", "data centre", "cell site", "exchange", "fibre hub"),
        ("router log", "link budget", "spectrum plan", "trouble ticket", "site survey", "traffic report"),
        ("handover", "latency", "jitter", "antenna", "bandwidth", "modem", "firewall", "spectrum", "roaming",
         "backhaul", "repeater", "protocol", "throughput", "packet", "gateway", "beamforming", "fibre",
         "switch", "carrier", "multiplexer", "satellite", "codec", "cable", "uplink"),
    ),
    "aviation": DomainVocab(
        ("pilot", "flight engineer", "air traffic controller", "dispatcher", "mechanic", "navigator"),
        ("hangar", "control tower", "airfield", "cockpit", "flight deck", "terminal"),
        ("flight plan", "logbook", "weather briefing", "maintenance card", "checklist", "load sheet"),
        ("aileron", "runway", "altimeter", "rudder", "turbine", "glide", "taxiway", "flap", "stall", "fuselage",
         "propeller", "beacon", "transponder", "autopilot", "landing", "throttle", "cargo", "heading",
         "crosswind", "pitot", "elevator", "wingtip", "descent", "holding"),
    ),
    "agriculture": DomainVocab(
        ("agronomist", "farmer", "soil scientist", "veterinarian", "grower", "harvester"),
        ("farm", "greenhouse", "orchard", "barn", "field station", "co-operative"),
        ("crop report", "soil sample", "seed catalogue", "yield log", "irrigation plan", "herd record"),
        ("tillage", "compost", "fallow", "silage", "mulch", "pesticide", "seedling", "harvest", "fertiliser",
         "pasture", "drought", "graft", "manure", "irrigation", "tractor", "orchard", "hybrid", "cattle",
         "wheat", "barley", "pollen", "weevil", "hay", "furrow"),
    ),
}

# The same abbreviations occur in every domain, meaning something different in each.
AMBIGUOUS_TERMS = ("ACS", "PE", "APR", "BER", "SLA", "MOU", "RTO", "DPA")


SYLLABLES = ("zor", "vat", "kel", "trax", "mib", "dro", "qua", "fen", "lux", "pry", "sol", "nak", "ver", "tis", "gol", "rum", "bex", "dal", "yon", "cri")


def term_pool() -> tuple[str, ...]:
    """A fixed pool of made-up words; the suite draws its terms from it by seed."""
    rng = random.Random(1234)
    words: list[str] = []
    while len(words) < 240:
        w = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3))))
        if w not in words:
            words.append(w)
    return tuple(words)


def general_lexicon() -> tuple[str, ...]:
    """Every word the suite uses in prompts and answers, for the base model's pretraining
    corpus: the base knows the words, never which term means which."""
    words: set[str] = set(AMBIGUOUS_TERMS) | set(term_pool())
    for v in DOMAINS.values():
        words.update(v.roles + v.places + v.documents + v.answers)
    return tuple(sorted(words))
