"""The site daemon's gRPC service and the ClientApp's forwarding helpers, in one process
(no Flower daemons): what the deployment test relies on, checked quickly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

from fedmoe.shared.errors import FedmoeError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    from fedmoe.client import daemon
    from fedmoe.client.site import SiteSettings
    from fedmoe.simulations.domain_suite import make_suite

    root = tmp_path_factory.mktemp("daemon")
    make_suite(root / "suite", domains=2, sites=2, seed=0)
    settings = SiteSettings(str(root / "suite" / "site-00"), None, 4, "none", str(tiny_model_dir))
    sock_dir = tempfile.mkdtemp(prefix="fedmoe-test-")
    server, address = daemon.serve(settings, f"unix:{sock_dir}/d.sock", root / "audit.jsonl")
    yield {"address": address, "settings": settings, "audit": root / "audit.jsonl"}
    server.stop(0)
    shutil.rmtree(sock_dir, ignore_errors=True)


def test_forwarded_train_round_trips_a_valid_delta(served):
    from fedmoe.client import daemon
    from fedmoe.client import site
    from fedmoe.shared.delta import LoraDelta

    info = daemon.forward_describe(served["address"], 7, 60)
    assert info["domain"] == "medicine" and info["rank"] == 4 and isinstance(info["num-examples"], int)
    trainer = site.trainer_for(served["settings"])
    arrays, meta = trainer.initial.to_records()
    cfg = dict(meta) | {"steps": 1, "batch-size": 4, "lr": 3e-3, "seed": 1, "round": 3, "expert": "medicine"}
    out_arrays, out_meta, metrics = daemon.forward_train(served["address"], arrays, cfg, 7, 120)
    delta = LoraDelta.from_records(out_arrays, out_meta)
    delta.validate(trainer.spec, trainer.fingerprint, where="reply")  # checksum computed by the daemon matches
    assert metrics["num-examples"] > 0 and metrics["train-loss"] > 0
    entries = [json.loads(line) for line in served["audit"].read_text().splitlines()]
    train = [e for e in entries if e["message"] == "train"][-1]
    assert train["round"] == 3 and train["run_id"] == 7 and train["sent"]["checksum"] == delta.checksum()
    assert train["sent"]["bytes"] == delta.num_bytes() and len(train["sent"]["sha256"]) == 64


def test_payload_round_trip_keeps_types_and_bytes():
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from fedmoe.client.daemon import payload_to_records, records_to_payload

    arrays = ArrayRecord({"q": Array(np.arange(6, dtype=np.int8).reshape(2, 3)), "s": Array(np.ones(2, np.float16))})
    config = ConfigRecord({"rank": 4, "alpha": 8.0, "relative": True, "keys": ["a", "b"], "shapes": [1, 2], "blob": b"\x00\xff"})
    back_arrays, back_config = payload_to_records(records_to_payload(arrays, config))
    assert dict(back_config) == dict(config) and isinstance(back_config["rank"], int)
    for k in arrays:
        a, b = arrays[k].numpy(), back_arrays[k].numpy()
        assert a.dtype == b.dtype and (a == b).all()


def test_daemon_errors_come_back_as_one_line(served):
    from fedmoe.client import daemon
    from fedmoe.shared.delta import LoraDelta
    import torch

    bad = LoraDelta({"x.lora_A.weight": torch.zeros(2, 3), "x.lora_B.weight": torch.zeros(3, 2)}, 2, 4.0, "sha256:nope")
    arrays, meta = bad.to_records()
    cfg = dict(meta) | {"steps": 1, "batch-size": 4, "lr": 3e-3, "seed": 1}
    with pytest.raises(FedmoeError, match="site daemon Train: .*rank 2.*rank 4"):
        daemon.forward_train(served["address"], arrays, cfg, 1, 60)


def test_daemon_and_transport_addresses_must_be_local():
    from fedmoe.client.daemon import check_local_address
    from fedmoe.server.federation.coordinator import Security, check_security

    assert check_local_address("127.0.0.1:5000") and check_local_address("unix:/tmp/x.sock")
    with pytest.raises(FedmoeError, match="not local"):
        check_local_address("10.1.2.3:5000")
    with pytest.raises(FedmoeError, match="loopback"):
        check_security("0.0.0.0", Security(insecure=True))
    with pytest.raises(FedmoeError, match="--ssl-ca-certfile"):
        check_security("127.0.0.1", Security())


@pytest.mark.parametrize("args", [
    ["coordinator", "start", "--insecure", "--host", "10.0.0.5", "--out", "/tmp/never"],
    ["site", "start", "--insecure", "--superlink", "10.0.0.5:9093", "--data", "/tmp/never"],
])
def test_insecure_off_loopback_is_refused_in_one_line(args):
    r = subprocess.run([sys.executable, "-m", "fedmoe.shared.cli", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "loopback" in lines[0], r.stderr


def test_app_config_matches_pyproject():
    from fedmoe.server.federation.coordinator import APP_CONFIG, app_pyproject
    from fedmoe.shared.flower_app import BUNDLE_MODULES, COMPONENTS

    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["config"] == APP_CONFIG
    assert app["components"] == COMPONENTS == app_pyproject(APP_CONFIG)["tool"]["flwr"]["app"]["components"]
    assert sorted(app["fab-include"]) == sorted(BUNDLE_MODULES)  # what a site accepts in a bundle


def test_forwarding_clientapp_does_not_import_torch():
    code = "import sys, fedmoe.client.client_app; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr


@pytest.mark.parametrize("privacy", ["none", "dp"])
def test_forwarding_clientapp_serves_strategy_rounds(served, tiny_model_dir, privacy):
    """The deployed ClientApp (node config `daemon-address`) answers the strategy's own
    messages, privacy options included, and the strategy accepts the replies."""
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedmoe.client.client_app import build_client_app
    from fedmoe.server.federation.strategy import DomainExpertStrategy, Node, StrategyConfig
    from fedmoe.shared.modeling import adapter_spec_for, model_fingerprint

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        app = build_client_app()
        ctx = Context(run_id=1, node_id=7, node_config={"daemon-address": served["address"]}, state=RecordDict(), run_config={})
        info = dict(app(Message(RecordDict(), dst_node_id=7, message_type="query.describe"), ctx).content["config"])
        s = DomainExpertStrategy(StrategyConfig(local_steps=1, batch_size=4, privacy=privacy, clip=0.5),
                                 adapter_spec_for(tiny_model_dir), model_fingerprint(tiny_model_dir))
        s.add_node(Node(7, info["site"], info["domain"], int(info["rank"]), info["fingerprint"], int(info["num-examples"])))
        (expert, node, msg), = s.configure_train(1)
        reply = app(msg, ctx)
        assert not reply.has_error(), reply.error
        result = s.aggregate_train(1, [(expert, node, msg)], [reply])
        assert [p["status"] for p in result.participation] == ["ok"], result.participation
        arrays, meta = s.expert_delta(info["domain"]).to_records()
        evaluate = app(Message(RecordDict({"arrays": arrays, "config": meta}), dst_node_id=7, message_type="evaluate"), ctx)
        assert evaluate.content["metrics"]["num-examples"] > 0
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


def test_daemon_refuses_a_train_below_its_policy_and_audits_it(served, tmp_path):
    """Deployed, the daemon (the site's own process) enforces the policy: the refusal comes
    back to the ClientApp as SitePolicyError (one line), nothing is trained or sent, and
    the audit log says what was refused."""
    from dataclasses import replace

    from fedmoe.client import daemon, site
    from fedmoe.shared.errors import SitePolicyError

    settings = replace(served["settings"], min_privacy="dp,secagg")
    sock_dir = tempfile.mkdtemp(prefix="fedmoe-test-")
    server, address = daemon.serve(settings, f"unix:{sock_dir}/p.sock", tmp_path / "audit.jsonl")
    try:
        arrays, meta = site.trainer_for(settings).initial.to_records()
        cfg = dict(meta) | {"steps": 1, "batch-size": 4, "lr": 3e-3, "seed": 1, "round": 2, "expert": "medicine",
                            "privacy": "ffa", "freeze-a": True}
        with pytest.raises(SitePolicyError, match="^site policy: refused to train under privacy mode ffa; this site accepts dp, secagg$"):
            daemon.forward_train(address, arrays, cfg, 5, 60)
        with pytest.raises(SitePolicyError, match="no evaluation metrics"):
            daemon.forward_evaluate(address, arrays, dict(meta), 5, 60)
        entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
        refused = [e for e in entries if e["message"] == "train"]
        assert len(refused) == 1 and refused[0]["refused"].startswith("site policy") and "sent" not in refused[0]
    finally:
        server.stop(0)
        shutil.rmtree(sock_dir, ignore_errors=True)
