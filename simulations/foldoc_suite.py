"""Domain definitions from FOLDOC (Debian `dict-foldoc`), for `fedmoe data make-suite --source foldoc`.

`foldoc.dict.dz` is dictzip (gzip with a seek table; `gzip` reads it whole);
`foldoc.index` has one `headword<TAB>offset<TAB>length` a line, offset and length in
dictd's base64, into the uncompressed bytes. An entry is its headword line(s), a blank
line, and a body whose senses are numbered `1. <tag, tag> text` (or unnumbered); the
`<tags>` say the subject, which maps to a domain below. A headword with senses in two
chosen domains ("gateway": networking and computing) is a conflict term.
"""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

from fedmoe.shared.errors import FedmoeError
from fedmoe.simulations.definition_suite import Definition, build_suite

DEFAULT_DIR = "/usr/share/dictd"
ENV_DIR = "FEDMOE_FOLDOC_DIR"

# domain -> FOLDOC subject tags (a sense's first tag found here decides its domain).
DOMAIN_TAGS: dict[str, tuple[str, ...]] = {
    "computing": ("programming", "operating system", "hardware", "storage", "database", "algorithm", "software",
                  "processor", "architecture", "file format", "parallel", "compression", "computer"),
    "networking": ("networking", "protocol", "web", "messaging", "security"),
    "telecom": ("communications", "telecommunications", "wireless", "radio", "telephony"),
}
MAX_GLOSS_CHARS = 72  # the default model sees 128 positions: prompt + gloss must fit
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def data_dir(path: str | Path | None = None) -> Path:
    path = Path(path or os.environ.get(ENV_DIR) or DEFAULT_DIR)
    if not (path / "foldoc.dict.dz").is_file() or not (path / "foldoc.index").is_file():
        raise FedmoeError(f"FOLDOC data not found in {path} (foldoc.dict.dz, foldoc.index): apt-get install dict-foldoc, "
                          f"or set {ENV_DIR}")
    return path


def b64_number(text: str) -> int:
    n = 0
    for ch in text:
        n = n * 64 + B64.index(ch)
    return n


_SENSE = re.compile(r"(?m)^\s*(\d+)\.\s+")
_TAGS = re.compile(r"^\s*<([^>]*)>\s*")


def first_sentence(text: str) -> str:
    text = re.sub(r"\{([^}]*)\}", r"\1", text)  # {cross references} -> plain words
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"^\([^)]*\)\s*", "", text)  # "(TCP)": the abbreviation
    m = re.search(r"(?<!\b[a-z]\.[a-z])(?<!\be\.g)(?<!\bi\.e)\.(\s|$)", text)
    return (text[: m.start()] if m else text).strip()


def senses(body: str) -> list[tuple[list[str], str]]:
    """[(tags, gloss)] of an entry body."""
    parts = _SENSE.split(body)
    chunks = [parts[0]] if len(parts) == 1 else parts[2::2]
    out = []
    for chunk in chunks:
        tags: list[str] = []
        m = _TAGS.match(chunk)
        if m:
            tags = [t.strip() for t in m.group(1).split(",")]
            chunk = chunk[m.end():]
        gloss = first_sentence(chunk)
        if gloss:
            out.append((tags, gloss))
    return out


def read_entries(path: Path) -> list[tuple[str, list[tuple[list[str], str]]]]:
    """[(headword, senses)], one per entry (an entry's alias headwords are skipped)."""
    with gzip.open(path / "foldoc.dict.dz") as f:
        data = f.read()
    seen, entries = set(), []
    for line in (path / "foldoc.index").read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or parts[0].startswith("00-database"):
            continue
        offset = b64_number(parts[1])
        if offset in seen:
            continue
        seen.add(offset)
        text = data[offset : offset + b64_number(parts[2])].decode("utf-8", errors="replace")
        head, _, body = text.partition("\n\n")
        entries.append((head.splitlines()[0].strip(), senses(body)))
    return entries


def sense_domain(tags: list[str], domains: list[str]) -> str | None:
    for tag in tags:
        for d in domains:
            if tag in DOMAIN_TAGS[d]:
                return d
    return None


def foldoc_definitions(domains: list[str], path: str | Path | None = None) -> dict[str, list[Definition]]:
    unknown = [d for d in domains if d not in DOMAIN_TAGS]
    if unknown:
        raise FedmoeError(f"foldoc: unknown domain {unknown[0]!r}: known domains are {', '.join(DOMAIN_TAGS)}")
    out: dict[str, dict[str, Definition]] = {d: {} for d in domains}
    for head, entry in read_entries(data_dir(path)):
        glosses = [g for _, g in entry if len(g) <= MAX_GLOSS_CHARS]
        for tags, gloss in entry:
            domain = sense_domain(tags, domains)
            if domain is None or len(gloss) > MAX_GLOSS_CHARS or head.lower() in out[domain]:
                continue
            # A gloss that names its own headword gives the answer away in every choice test.
            if head.lower() in gloss.lower():
                continue
            out[domain][head.lower()] = Definition(domain, head, gloss, tuple(g for g in glosses if g != gloss))
    return {d: sorted(v.values(), key=lambda x: x.key) for d, v in out.items()}


def sources_md(path: Path) -> str:
    return "\n".join([
        "# Sources", "",
        "Terms and glosses: **FOLDOC**, the Free On-line Dictionary of Computing, editor Denis Howe",
        f"(https://foldoc.org), read from the Debian package `dict-foldoc` ({path}). Subjects come from",
        "the entries' `<tags>`; glosses are cut to their first sentence, cross-reference braces removed.", "",
        "Licence: FOLDOC is distributed under the GNU Free Documentation License (version 1.1 or any",
        "later version published by the Free Software Foundation). These derived records are a",
        "modified version under the same licence; attribution: \"Data from FOLDOC, the Free On-line",
        "Dictionary of Computing, (c) 1985-2024 Denis Howe, https://foldoc.org\".", "",
    ])


def make_foldoc_suite(out: str | Path, domains: list[str], sites_per_domain: int = 2, seed: int = 0,
                      path: str | Path | None = None, **options) -> dict:
    root = data_dir(path)
    return build_suite(out, foldoc_definitions(domains, root), "foldoc", sources_md(root), sites_per_domain, seed, **options)
