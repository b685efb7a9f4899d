"""Hot swap: `fedmoe serve` on a live run (run.db still "running", no experts/ yet)
serves the newest verified round's checkpoints, follows each newly committed round
(swapped between batches, never under a request in flight), refuses a checkpoint whose
sha256 does not match, and says which round it serves (/v1/models, every completion).

The live run is the `served_run` experts written as round 1 through the `RunStore` API;
round 2 gives every expert another domain's tensors (a different answer per expert)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from deploy_helpers import fedmoe_serve

httpx = pytest.importorskip("httpx")

KEY = "sk-test-" + "cd" * 12
PROMPT = "The contract between the parties states that"


def adapter_delta(path: Path):
    """A peft adapter folder (experts/<domain>/) as the LoraDelta a round checkpoints."""
    from safetensors.torch import load_file

    from fedmoe.shared.delta import LoraDelta
    from fedmoe.shared.modeling import ADAPTER_META

    cfg = json.loads((path / "adapter_config.json").read_text())
    meta = json.loads((path / ADAPTER_META).read_text())
    return LoraDelta(load_file(str(path / "adapter_model.safetensors")), int(cfg["r"]), float(cfg["lora_alpha"]),
                     meta["base_fingerprint"])


@pytest.fixture(scope="module")
def rounds(served_run):
    """{round: {expert: LoraDelta}}: 1 = the trained experts, 2 = each expert gets the next one's tensors."""
    experts = sorted(p.name for p in (served_run / "experts").iterdir())
    first = {e: adapter_delta(served_run / "experts" / e) for e in experts}
    return {1: first, 2: {e: first[experts[(i + 1) % len(experts)]] for i, e in enumerate(experts)}}


def commit(run: Path, rnd: int, experts: dict, bad_sha: bool = False, monkeypatch=None) -> None:
    from fedmoe.server.federation import run_store
    from fedmoe.server.federation.run_store import RunStore

    store = RunStore(run)
    try:
        if rnd == 1:
            store.start_run("test", 0, {})
        store.begin_round(rnd)
        if bad_sha:  # the sha256 recorded in run.db is not the file's: what a corrupted checkpoint looks like
            monkeypatch.setattr(run_store, "file_sha256", lambda path: "0" * 64)
        store.commit_round(rnd, [], {}, [], experts)
    finally:
        if bad_sha:
            monkeypatch.undo()
        store.close()


def live_copy(served_run: Path, dest: Path, rounds: dict) -> Path:
    """A run still federating: run.json, gates/, run.db with round 1 committed; no experts/."""
    dest.mkdir(parents=True)
    shutil.copy(served_run / "run.json", dest / "run.json")
    shutil.copytree(served_run / "gates", dest / "gates")
    commit(dest, 1, rounds[1])
    return dest


def decode_alone(served, expert: str, n: int = 12, prompt: str = PROMPT):
    """(text, round) of one greedy request through the continuous batcher (the HTTP API's decoder)."""
    from fedmoe.server.serving.continuous_batching import ContinuousBatcher, DecodeRequest

    batcher = ContinuousBatcher(served, max_batch=4)
    try:
        events, done = [], threading.Event()
        ids = served.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        batcher.submit(DecodeRequest(prompt, ids, lambda ev: (events.append(ev), ev[0] in ("done", "error") and done.set()),
                                     expert=expert, max_tokens=n, temperature=0, ignore_eos=True))
        assert done.wait(120)
    finally:
        batcher.stop()
    assert events[-1][0] == "done", events[-1]
    return "".join(ev[1] for ev in events if ev[0] == "text"), events[0][3]


def grpc_round(info) -> int:
    import grpc

    from fedmoe.protos import inference_pb2 as pb
    from fedmoe.protos import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(info["address"]) as channel:
        reply = pb_grpc.InferenceServiceStub(channel).Route(pb.RouteRequest(prompt=PROMPT), timeout=60,
                                                            metadata=[("authorization", f"Bearer {info['token']}")])
    return reply.round


def test_serve_follows_a_live_run_and_refuses_a_corrupt_round(served_run, rounds, tmp_path, monkeypatch):
    from fedmoe.server.serving.inference import load_served_run

    run = live_copy(served_run, tmp_path / "live", rounds)
    keys = tmp_path / "keys.txt"
    keys.write_text(KEY + "\n")
    with fedmoe_serve(run, "--http-port", "0", "--api-key-file", str(keys), "--reload-interval", "0.2",
                      "--dashboard-port", "0", "--operator-port", "-1") as info:
        assert info["round"] == 1 and info["reload_interval"] == 0.2  # from the checkpoints: no experts/ yet
        http = httpx.Client(base_url=info["http"]["url"], headers={"authorization": f"Bearer {KEY}"}, timeout=120)
        board = httpx.Client(base_url=info["dashboard"]["dashboard"], timeout=30,
                             headers={"authorization": f"Bearer {info['dashboard']['token']}"})
        assert board.get("/api/run").json()["serving"]["round"] == 1  # the dashboard names the served round

        def served_round(want=None, timeout=30.0):
            deadline = time.monotonic() + timeout
            while True:
                status = http.get("/models").json()["fedmoe"]
                if want is None or want(status) or time.monotonic() > deadline:
                    return status
                time.sleep(0.1)

        def complete(expert):
            body = http.post("/completions", json={"model": f"expert/{expert}", "prompt": PROMPT, "max_tokens": 12,
                                                   "temperature": 0, "ignore_eos": True}).json()
            return body["choices"][0]["text"], body["fedmoe"]["rounds"]

        status = served_round()
        assert status["round"] == 1 and status["watching"] and status["run_state"] == "running"
        assert "arrow" in status["gates_refreshed"] and "prototype" in status["gates_kept"]
        before = {e: complete(e) for e in ("law", "medicine")}
        assert all(r == [1] for _, r in before.values())

        started = time.monotonic()
        commit(run, 2, rounds[2])
        status = served_round(lambda s: s["round"] == 2)
        took = time.monotonic() - started
        assert status["round"] == 2 and status["swaps"] == 1, status
        assert took < 10, took  # polls every 0.2 s: well within bounds
        after = {e: complete(e) for e in ("law", "medicine")}
        assert all(r == [2] for _, r in after.values())
        assert grpc_round(info) == 2  # the gRPC service says it too
        assert board.get("/api/run").json()["serving"]["round"] == 2  # and the dashboard

        # round 3's recorded sha256 does not match its files: refused, round 2 keeps serving
        commit(run, 3, rounds[1], bad_sha=True, monkeypatch=monkeypatch)
        status = served_round(lambda s: "3" in s["refused_rounds"])
        assert "sha256" in status["refused_rounds"]["3"] and status["round"] == 2 and status["latest_committed_round"] == 3
        assert complete("law") == after["law"]

        commit(run, 4, rounds[1])  # the next good round goes in
        assert served_round(lambda s: s["round"] == 4)["round"] == 4
        assert complete("law") == (before["law"][0], [4])

    # the reference: a serve started afresh on round 2's weights answers what the hot-swapped one did
    commit_dir = tmp_path / "fresh"
    live_copy(served_run, commit_dir, rounds)
    commit(commit_dir, 2, rounds[2])
    fresh = load_served_run(commit_dir, "cpu")
    assert fresh.round == 2
    for e in ("law", "medicine"):
        assert decode_alone(fresh, e) == (after[e][0], 2)
    assert any(before[e][0] != after[e][0] for e in before)  # the swap changed what the experts say


def test_a_swap_waits_for_the_batch_in_flight_and_gates_follow(served_run, rounds, tmp_path, monkeypatch):
    from fedmoe.server.serving.continuous_batching import ContinuousBatcher, DecodeRequest
    from fedmoe.server.serving.hot_swap import RoundWatcher
    from fedmoe.server.serving.inference import load_served_run
    from fedmoe.shared.errors import FedmoeError

    run = live_copy(served_run, tmp_path / "live", rounds)
    served = load_served_run(run, "cpu")
    assert served.round == 1 and {"arrow", "smile", "prototype"} <= set(served.gates)
    old_text, _ = decode_alone(served, "law", 40)
    swap = served.prepare_swap(2, rounds[2])  # built off the decoding thread

    batcher = ContinuousBatcher(served, max_batch=4)
    try:
        got = {"a": [], "b": []}
        done = {k: threading.Event() for k in got}
        first_text = threading.Event()

        def ask(key, n):
            def emit(ev):
                got[key].append(ev)
                if ev[0] == "text":
                    first_text.set()
                if ev[0] in ("done", "error"):
                    done[key].set()
            ids = served.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
            batcher.submit(DecodeRequest(PROMPT, ids, emit, expert="law", max_tokens=n, temperature=0, ignore_eos=True))

        ask("a", 40)
        assert first_text.wait(60)
        assert served.stage_swap(swap) is False  # a request is in flight: the swap waits
        assert served.round == 1 and served.swap_pending
        ask("b", 12)  # arrives while the swap waits: does not join round 1's batch
        assert done["a"].wait(120) and done["b"].wait(120)
    finally:
        batcher.stop()
    text = {k: "".join(ev[1] for ev in v if ev[0] == "text") for k, v in got.items()}
    assert got["a"][0][3] == 1 and text["a"] == old_text  # finished on the old weights, whole
    assert got["b"][0][3] == 2 and served.round == 2 and not served.swap_pending
    assert (text["b"], 2) == decode_alone(served, "law", 12)

    # the gates computed from the experts' weights follow them: as a fresh load of round 2 routes
    commit(run, 2, rounds[2])
    fresh = load_served_run(run, "cpu")
    prompts = [PROMPT, "The patient was given a dose of", "The router dropped packets on"]
    for gate in ("arrow", "smile"):
        assert served.route(prompts, gate).allclose(fresh.route(prompts, gate), atol=1e-5), gate
    assert text["b"] == decode_alone(fresh, "law", 12)[0]

    # a corrupt round and a new domain, through the watcher's own poll: logged, one line each
    lines = []
    watcher = RoundWatcher(served, run, interval=60, log=lines.append, start=False)
    commit(run, 3, rounds[1] | {"zoology": rounds[1]["law"]}, bad_sha=True, monkeypatch=monkeypatch)
    assert watcher.poll() == "refused" and served.round == 2
    assert len(lines) == 2 and "new expert 'zoology'" in lines[0] and "restart" in lines[0]
    assert lines[1].startswith("hot swap: round 3 refused, still serving round 2") and "sha256" in lines[1]
    assert watcher.poll() == "idle" and len(lines) == 2  # not retried, not logged again
    commit(run, 4, rounds[1] | {"zoology": rounds[1]["law"]})
    assert watcher.poll() == "staged" and served.round == 4 and lines[-1] == "hot swap: serving round 4"
    with pytest.raises(FedmoeError, match="do not fit the served rank"):
        served.prepare_swap(5, {"law": rounds[1]["law"].padded_to(rounds[1]["law"].rank + 4)})
