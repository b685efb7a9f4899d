"""What leaves a site: every reply of the ClientApp (QUERY describe, TRAIN, EVALUATE, and
TRAIN in the frozen-A / DP mode) holds LoRA factors and a few numbers and names — never
training text or token ids."""

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedmoe.client.client_app import build_client_app
from fedmoe.server.federation.strategy import DomainExpertStrategy, Node, StrategyConfig
from fedmoe.shared.data import find_sites, load_site
from fedmoe.shared.delta import A_SUFFIX, B_SUFFIX
from fedmoe.shared.modeling import adapter_spec_for, model_fingerprint


pytestmark = pytest.mark.usefixtures("flower_task_identity")


def leaves(content: RecordDict):
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            for key, arr in record.items():
                yield name, key, arr
        else:
            for key, value in record.items():
                yield name, key, value


def check_payload(reply: Message, site) -> None:
    texts = [t for r in site.train + site.eval for t in (r.prompt, r.completion) if t and len(t.strip()) >= 4]
    words = {w for t in texts for w in t.split() if len(w) >= 6 and w.isalpha()}
    assert not reply.has_error(), reply.error
    for record, key, value in leaves(reply.content):
        where = f"{record}/{key}"
        if record == "arrays":
            assert key.endswith((A_SUFFIX, B_SUFFIX)), where
            assert value.dtype in ("float32", "float16"), f"{where}: {value.dtype}"
            continue
        assert isinstance(value, (int, float, bool, str)), f"{where}: {type(value).__name__} (a list could carry token ids)"
        if isinstance(value, str):
            assert len(value) <= 80, where
            assert not any(t in value or value in t for t in texts if len(value) >= 4), f"{where} carries record text"
            assert not (set(value.split()) & words), f"{where} carries words of the site's records"


def test_no_site_message_carries_text_or_token_ids(tiny_model_dir, suite_dir):
    site = load_site(find_sites(suite_dir)[0])
    plan = [{"data-path": str(site.path), "domain": site.domain, "rank": 4, "quant": "none", "model-path": str(tiny_model_dir)}]
    app = build_client_app(plan)
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})

    describe = app(Message(RecordDict(), dst_node_id=7, message_type="query.describe"), ctx)
    check_payload(describe, site)
    info = dict(describe.content["config"])
    assert set(info) == {"site", "domain", "rank", "quant", "fingerprint", "num-examples"}

    for privacy in ("none", "dp"):
        s = DomainExpertStrategy(StrategyConfig(local_steps=2, batch_size=4, privacy=privacy, clip=0.5),
                                 adapter_spec_for(tiny_model_dir), model_fingerprint(tiny_model_dir))
        s.add_node(Node(7, info["site"], info["domain"], int(info["rank"]), info["fingerprint"], int(info["num-examples"])))
        (expert, node, msg), = s.configure_train(1)
        reply = app(msg, ctx)
        check_payload(reply, site)
        assert set(reply.content) == {"arrays", "config", "metrics"}
        sent_metrics = set(reply.content["metrics"])
        if privacy == "dp":  # no training loss (nor token count): only what the mechanism covers leaves
            assert sent_metrics == {"num-examples", "seconds"}, sent_metrics
        else:
            assert {"num-examples", "train-loss", "tokens"} <= sent_metrics, sent_metrics
        result = s.aggregate_train(1, [(expert, node, msg)], [reply])
        assert [p["status"] for p in result.participation] == ["ok"], result.participation

    arrays, meta = s.expert_delta(info["domain"]).to_records()
    evaluate = app(Message(RecordDict({"arrays": arrays, "config": meta}), dst_node_id=7, message_type="evaluate"), ctx)
    check_payload(evaluate, site)
    assert set(evaluate.content) == {"metrics"}
    # An EVALUATE declared under dp is refused: no accuracy or loss leaves the site.
    refused = app(Message(RecordDict({"arrays": arrays, "config": ConfigRecord(dict(meta) | {"privacy": "dp"})}),
                          dst_node_id=7, message_type="evaluate"), ctx)
    assert refused.has_error() and refused.error.reason.startswith("site policy: no evaluation metrics")


def test_a_site_with_a_dp_policy_refuses_a_plain_train_and_sends_nothing(tiny_model_dir, suite_dir):
    site = load_site(find_sites(suite_dir)[0])
    plan = [{"data-path": str(site.path), "domain": site.domain, "rank": 4, "quant": "none", "model-path": str(tiny_model_dir),
             "min-privacy": "dp", "min-noise-multiplier": 0.5}]
    app = build_client_app(plan)
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    for privacy, z in (("none", 1.0), ("ffa", 1.0), ("dp", 0.3)):
        s = DomainExpertStrategy(StrategyConfig(local_steps=2, batch_size=4, privacy=privacy, noise_multiplier=z, clip=0.5),
                                 adapter_spec_for(tiny_model_dir), model_fingerprint(tiny_model_dir))
        s.add_node(Node(7, site.name, site.domain, 4, model_fingerprint(tiny_model_dir), len(site.train)))
        (expert, node, msg), = s.configure_train(1)
        reply = app(msg, ctx)
        assert reply.has_error()  # an error reply: no arrays, no metrics
        reason = reply.error.reason
        assert reason.startswith("site policy: refused to train under ") and "\n" not in reason, reason
        assert ("noise multiplier 0.3 < 0.5" in reason) if privacy == "dp" else (f"privacy mode {privacy}" in reason)
        result = s.aggregate_train(1, [(expert, node, msg)], [reply])
        assert result.participation[0]["status"] == "failed" and result.participation[0]["reason"] == f"site error: {reason}"
        assert expert not in s.experts  # nothing aggregated
