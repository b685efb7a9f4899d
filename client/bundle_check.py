"""The site's check of a Flower app bundle (FAB) before its SuperNode runs it.

Whoever can submit a run on the coordinator's Control API (its operator, any local user
of that machine) chooses the bundle every site's SuperNode installs and whose ClientApp
it runs next to the site's data. Flower 1.42 verifies bundles only against Flower Hub
(`--trusted-entities`), so a site checks fedmoe's bundle itself: `check_bundle` accepts
only a bundle whose components are fedmoe's own (`fedmoe.shared.flower_app`), that
carries no file besides its manifest, Flower's hash list and the two reference modules
(`fab-include`), each equal byte for byte to this site's installed copy (Flower puts the
bundle's folder first on the ClientApp's `sys.path`, so any extra module could shadow
an installed one), and, when the operator pinned bundles (`--trust-fab-hash`), whose
sha256 is one of them. The run config the bundle and the run carry is data, not code:
it is allowed here, and the site daemon validates what it reads from it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import re
import tomllib
import zipfile
from functools import lru_cache
from pathlib import Path

from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.flower_app import BUNDLE_MODULES, COMPONENTS, CONTENT_LIST, MANIFEST

ALLOWED = (MANIFEST, CONTENT_LIST, *BUNDLE_MODULES)
MAX_ENTRY_BYTES = 4 << 20  # fedmoe's largest bundle entry is ~20 kB; bound what a foreign one makes us inflate


class ForeignBundle(FedmoeError):
    """The bundle is not fedmoe's own app: the message names the file or field that differs."""


def parse_hashes(values) -> frozenset[str]:
    """`--trust-fab-hash` values (repeatable, or comma-separated) -> lower-case sha256 hex digests."""
    out = set()
    for value in values or ():
        for item in str(value).split(","):
            item = item.strip().lower()
            if not item:
                continue
            if not re.fullmatch(r"[0-9a-f]{64}", item):
                raise FedmoeError(f"--trust-fab-hash: not a sha256 hex digest (64 hex digits): {item!r}")
            out.add(item)
    return frozenset(out)


def installed_path(module: str) -> Path:
    """This site's file of a fedmoe module, found without importing it (nor the server package)."""
    parts = module.split(".")
    spec = importlib.util.find_spec(".".join(parts[:2]))
    if spec is None or not spec.submodule_search_locations:
        raise ForeignBundle(f"this site has no installed {'.'.join(parts[:2])} to compare the bundle with")
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts[2:]).with_suffix(".py")


@lru_cache(maxsize=None)
def installed_copy(module: str) -> bytes:
    path = installed_path(module)
    try:
        return path.read_bytes()
    except OSError as err:
        raise ForeignBundle(f"this site has no installed copy of {module} to compare the bundle with ({path}: {err.strerror})") from None


def _read(zf: zipfile.ZipFile, name: str) -> bytes:
    info = zf.getinfo(name)
    if info.file_size > MAX_ENTRY_BYTES:
        raise ForeignBundle(f"{name} is {info.file_size} bytes, more than any file of fedmoe's bundle")
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:  # bad CRC, truncated, unknown compression
        raise ForeignBundle(f"{name} cannot be read from the bundle: {err}") from None


def check_bundle(content: bytes, trusted_hashes: frozenset[str] = frozenset()) -> str:
    """Return the bundle's sha256 if it is fedmoe's own app; raise ForeignBundle naming
    the first thing that differs otherwise."""
    digest = hashlib.sha256(content).hexdigest()
    if trusted_hashes and digest not in trusted_hashes:
        raise ForeignBundle(f"bundle sha256 {digest} is not one of the {len(trusted_hashes)} pinned with --trust-fab-hash")
    try:
        zf = zipfile.ZipFile(io.BytesIO(content))
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise ForeignBundle(f"not a zip archive ({err})") from None
    with zf:
        names = zf.namelist()
        for name in names:
            if name not in ALLOWED:
                raise ForeignBundle(f"extra file {name!r} (fedmoe's bundle carries only {', '.join(ALLOWED)})")
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ForeignBundle(f"{twice[0]} appears more than once in the archive")
        if MANIFEST not in names:
            raise ForeignBundle(f"no {MANIFEST}")
        try:
            manifest = tomllib.loads(_read(zf, MANIFEST).decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise ForeignBundle(f"{MANIFEST} is not valid TOML ({err})") from None
        components = manifest
        for key in ("tool", "flwr", "app", "components"):
            components = components.get(key) if isinstance(components, dict) else None
        if not isinstance(components, dict):
            raise ForeignBundle(f"{MANIFEST} has no [tool.flwr.app.components]")
        for key in sorted(set(components) | set(COMPONENTS)):
            if components.get(key) != COMPONENTS.get(key):
                theirs = repr(components[key]) if key in components else "missing"
                ours = repr(COMPONENTS[key]) if key in COMPONENTS else "no such component"
                raise ForeignBundle(f"{MANIFEST} [tool.flwr.app.components] {key} = {theirs}, not fedmoe's {ours}")
        for name, module in BUNDLE_MODULES.items():
            if name in names and _read(zf, name) != installed_copy(module):
                raise ForeignBundle(f"{name} differs from this site's installed copy ({installed_path(module)})")
    return digest
