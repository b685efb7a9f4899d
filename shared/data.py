"""The site data format.

A site folder holds `train.jsonl`, `eval.jsonl` and `site.toml` (at least
`domain = "..."`). A record is `{"prompt", "completion"}` or `{"text"}` (a text record
trains on the whole string and has no exact-match answer). An evaluation record may also
carry `"choices": [...]` (the completion is one of them): it is then scored as multiple
choice too (`fedmoe.shared.multiple_choice`). A suite root holds site
folders plus `mixed-eval.jsonl`, whose records also carry `"domain"`.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.names import check_name


@dataclass(frozen=True)
class Record:
    prompt: str
    completion: str
    domain: str | None = None
    choices: tuple[str, ...] | None = None  # multiple choice: completion is one of them

    @property
    def is_text(self) -> bool:
        return self.prompt == "" and self.completion != ""


@dataclass
class Site:
    path: Path
    domain: str
    train: list[Record]
    eval: list[Record]
    settings: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name


def parse_record(obj, where: str) -> Record:
    if not isinstance(obj, dict):
        raise FedmoeError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    domain = obj.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise FedmoeError(f"{where}: 'domain' must be a string")
    if "prompt" in obj or "completion" in obj:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise FedmoeError(f"{where}: 'prompt' and 'completion' must both be strings")
        if not completion.strip():
            raise FedmoeError(f"{where}: empty 'completion'")
        return Record(prompt, completion, domain, parse_choices(obj, completion, where))
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise FedmoeError(f"{where}: 'text' must be a non-empty string")
        return Record("", obj["text"], domain)
    raise FedmoeError(f"{where}: record needs 'prompt' and 'completion', or 'text'")


def parse_choices(obj: dict, completion: str, where: str) -> tuple[str, ...] | None:
    choices = obj.get("choices")
    if choices is None:
        return None
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise FedmoeError(f"{where}: 'choices' must be a list of at least two non-empty strings")
    if completion not in choices:
        raise FedmoeError(f"{where}: 'completion' is not one of the 'choices'")
    return tuple(choices)


def read_jsonl(path: str | Path) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise FedmoeError(f"data file not found: {path}")
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise FedmoeError(f"{path}:{lineno}: not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FedmoeError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
            records.append(parse_record(obj, f"{path}:{lineno}"))
    if not records:
        raise FedmoeError(f"{path}: no records")
    return records


def write_jsonl(path: str | Path, rows) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_site_settings(path: Path) -> dict:
    toml_path = path / "site.toml"
    if not toml_path.is_file():
        raise FedmoeError(f"site folder {path} has no site.toml (it must name the site's domain)")
    try:
        settings = tomllib.loads(toml_path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise FedmoeError(f"{toml_path}: {exc}") from None
    if not isinstance(settings.get("domain"), str) or not settings["domain"]:
        raise FedmoeError(f"{toml_path}: missing 'domain = \"...\"'")
    check_name(settings["domain"], "domain", str(toml_path))  # it becomes the coordinator's experts/<domain>/ folder
    return settings


def load_site(path: str | Path, domain: str | None = None) -> Site:
    """Read a site folder; `domain` (if given) must agree with site.toml."""
    path = Path(path)
    if not path.is_dir():
        raise FedmoeError(f"site data folder not found: {path}")
    settings = read_site_settings(path)
    if domain is not None and domain != settings["domain"]:
        raise FedmoeError(f"{path}/site.toml says domain {settings['domain']!r}, but {domain!r} was given")
    train = read_jsonl(path / "train.jsonl")
    evals = read_jsonl(path / "eval.jsonl") if (path / "eval.jsonl").exists() else []
    dom = settings["domain"]
    return Site(
        path,
        dom,
        [replace(r, domain=r.domain or dom) for r in train],
        [replace(r, domain=r.domain or dom) for r in evals],
        settings,
    )


@dataclass(frozen=True)
class SiteRef:
    """A site folder known by its domain (site.toml) alone: what a coordinator needs to
    plan a federation of thousands of sites without holding their records."""

    path: Path
    domain: str

    @property
    def name(self) -> str:
        return self.path.name

    def load(self) -> Site:
        return load_site(self.path, self.domain)


def site_ref(path: str | Path) -> SiteRef:
    """The site's domain, and its train file checked to exist, without reading a record
    (a malformed record is found by the site, which is then refused with the reason)."""
    path = Path(path)
    if not path.is_dir():
        raise FedmoeError(f"site data folder not found: {path}")
    domain = read_site_settings(path)["domain"]
    if not (path / "train.jsonl").is_file():
        raise FedmoeError(f"data file not found: {path / 'train.jsonl'}")
    return SiteRef(path, domain)


def find_sites(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise FedmoeError(f"suite folder not found: {root}")
    sites = sorted(p for p in root.iterdir() if p.is_dir() and (p / "site.toml").exists())
    if not sites:
        raise FedmoeError(f"no site folders (with site.toml) in {root}")
    return sites


def load_mixed_eval(root: str | Path) -> list[Record]:
    records = read_jsonl(Path(root) / "mixed-eval.jsonl")
    for i, r in enumerate(records, 1):
        if r.domain is None:
            raise FedmoeError(f"{Path(root) / 'mixed-eval.jsonl'}:{i}: record has no 'domain'")
    return records


def load_conflict_eval(root: str | Path) -> list[Record]:
    """`conflict-eval.jsonl` (terms defined in several domains, held out of the mixed set)
    or [] for a suite without one (the synthetic suite)."""
    path = Path(root) / "conflict-eval.jsonl"
    if not path.exists():
        return []
    records = read_jsonl(path)
    for i, r in enumerate(records, 1):
        if r.domain is None:
            raise FedmoeError(f"{path}:{i}: record has no 'domain'")
    return records
