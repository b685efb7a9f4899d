"""The run configuration: `StrategyConfig` (how each round runs) inside `FederationPlan`
(one federation). Typed data with help text; fedmoe.shared.config derives from it the
Flower run config, pyproject's [tool.flwr.app.config], the flags of `fedmoe simulate` and
`fedmoe coordinator start`, and simulate.json. Imports neither torch nor Flower, so the
CLI can build its flags from it without loading either."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedmoe.shared.config import option, to_flat
from fedmoe.shared.errors import FedmoeError

CODECS = ("none", "fp16", "int8")  # fedmoe.shared.compression.CODECS (a test keeps them equal)
SERVER_OPTIMIZERS = ("none", "fedadam")
SHORT_ROUND_POLICIES = ("proceed", "retry", "fail")


@dataclass
class StrategyConfig:
    """How the coordinator runs each round; every field is a run-config key and a flag of
    `fedmoe simulate` / `fedmoe coordinator start` (fedmoe.shared.config)."""

    local_steps: int = option(30, help="optimizer steps per site per round")
    batch_size: int = option(16, help="site training batch size")
    lr: float = option(3e-3, help="site learning rate")
    seed: int = option(0, help="seed of site sampling and training")
    aggregation: str = option("exact", choices=("exact", "naive"),
                              help="exact: ΔW = Σ p_k B_k A_k, re-factorized per rank; naive: FedIT average of A and B")
    fraction: float = option(1.0, help="share of each domain's sites sampled per round")
    min_nodes: int = option(1, help="sites a domain needs to be trained in a round")
    round_timeout: float = option(900.0, help="seconds a round waits for its sites; late or dead sites count as failed")
    prox_mu: float = option(0.0, help="FedProx: proximal term weight on the sites (0: off)")
    max_update_norm: float = option(1e4, help="replies whose update norm exceeds this are rejected")
    single_expert: bool = option(False, flag=False, help="also train one adapter for all domains (the fedavg_single baseline)")
    alpha_per_rank: float = option(2.0, help="LoRA alpha / rank (2: the peft habit)")
    compression: str = option("none", choices=CODECS,
                              help="adapter codec on the wire, both ways (none = fp32)")
    robust: str = option("none", choices=("none", "norm", "trimmed-mean", "median"),
                         help="robust aggregation: norm = outlier rejection + norm bounding (exact); "
                              "trimmed-mean/median = coordinate-wise on factors")
    privacy: str = option("none", choices=("none", "ffa", "dp", "secagg"),
                          help="ffa: frozen shared A (FFA-LoRA); dp: ffa + site clipping + Gaussian noise + RDP "
                               "accounting; secagg: ffa + site clipping, per-domain sums through Flower's SecAgg+")
    noise_multiplier: float = option(1.0, help="dp: noise std / clip")
    clip: float | None = option(None, help="dp, secagg: site update norm bound C (unset: dp 1.0, secagg 100)")
    dp_delta: float = option(1e-5, help="dp: delta of the reported (epsilon, delta)")
    epsilon_budget: float | None = option(None, help="dp: stop before a round that would exceed this epsilon")
    server_opt: str = option("none", choices=SERVER_OPTIMIZERS,
                             help="server-side optimizer on each expert's aggregate (none: the aggregate is the expert)")
    # fedadam's lr ~ a typical |ΔW| entry change per round on the default model; tau is Adam's eps
    server_lr: float = option(3e-3, help="fedadam: server step size")
    server_tau: float = option(1e-3, help="fedadam: adaptivity tau (Adam's eps)")
    min_replies: int = option(1, help="accepted replies each expert needs per round, at most its sampled sites")
    short_round: str = option("proceed", choices=SHORT_ROUND_POLICIES,
                              help="a round short of --min-replies at its deadline: proceed with what arrived, retry = "
                                   "re-send to the missing sites then proceed, fail = re-send then stop the run")
    max_retries: int = option(1, help="retry/fail: re-sends per round before giving up")
    max_rank: int = option(64, help="the largest LoRA rank a site may announce (its adapter is aggregated at that rank)")
    max_examples: int = option(10_000_000, help="the most examples a site may claim (bounds its aggregation weight)")
    lr_schedule: str = option("cosine", choices=("constant", "cosine"),
                              help="sites' learning rate across the whole federation: cosine = linear warm-up, then "
                                   "cosine decay over rounds x local steps; constant = --lr every step")
    warmup: float = option(0.1, help="cosine: share of the federation's local steps spent warming up")
    eval_every: int = option(1, help="sites evaluate each expert on their own eval split every k-th round, for the "
                                     "accuracy curves (0: never)")

    @property
    def site_clip(self) -> float:
        """The clip norm in force: --clip, or the privacy mode's default."""
        from fedmoe.server.federation.privacy import default_clip

        return default_clip(self.privacy, self.clip)

    def __post_init__(self):  # checked when the config is made, before any federation starts or file is written
        from fedmoe.server.federation.privacy import PrivacyConfig
        from fedmoe.server.federation.robust import RobustConfig

        if self.aggregation not in ("exact", "naive"):
            raise FedmoeError(f"unknown aggregation {self.aggregation!r}: choose exact or naive")
        from fedmoe.shared import compression

        compression.check_codec(self.compression)
        RobustConfig(self.robust)
        PrivacyConfig(self.privacy, self.noise_multiplier, self.site_clip, self.dp_delta, self.epsilon_budget)
        if self.privacy == "secagg" and (self.robust != "none" or self.compression != "none"):
            raise FedmoeError("--privacy secagg: the coordinator never sees a single update, so --robust and --compression "
                              "do not apply (sites clip; SecAgg+ has its own quantization)")
        if self.server_opt not in SERVER_OPTIMIZERS:
            raise FedmoeError(f"unknown server optimizer {self.server_opt!r}: choose one of {', '.join(SERVER_OPTIMIZERS)}")
        if self.server_opt != "none" and self.privacy != "none":
            raise FedmoeError(f"--server-opt {self.server_opt} re-factorizes each expert, which breaks the frozen shared A of "
                              f"--privacy {self.privacy}: use one or the other")
        if self.short_round not in SHORT_ROUND_POLICIES:
            raise FedmoeError(f"unknown short-round policy {self.short_round!r}: choose {', '.join(SHORT_ROUND_POLICIES)}")
        from fedmoe.shared.training import LR_SCHEDULES

        if self.lr_schedule not in LR_SCHEDULES:
            raise FedmoeError(f"unknown lr schedule {self.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
        if not 0.0 <= self.warmup < 1.0 or self.eval_every < 0:
            raise FedmoeError(f"warmup must be in [0, 1) and eval-every >= 0, got {self.warmup} and {self.eval_every}")
        if self.min_replies < 1 or self.max_retries < 0:
            raise FedmoeError(f"min-replies must be >= 1 and max-retries >= 0, got {self.min_replies} and {self.max_retries}")
        if self.max_rank < 1 or self.max_examples < 1:
            raise FedmoeError(f"max-rank and max-examples must be >= 1, got {self.max_rank} and {self.max_examples}")



@dataclass
class FederationPlan:
    """One federation: the run config the ServerApp reads (fedmoe.shared.config views it
    as Flower's run config, pyproject's [tool.flwr.app.config] and command-line flags)."""

    model_dir: str = option("", key="model-path", flag=False, help="base model directory (empty: the built-in tiny model)")
    out_dir: str = option("runs/deployed", key="out", flag=False, help="run folder to write")
    rounds: int = option(3, help="federated rounds")
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    expected_nodes: int = option(1, key="expected-sites", help="sites to wait for before the first round")
    node_wait: float = option(120.0, help="seconds to wait for the expected sites")
    query_timeout: float = option(300.0, help="seconds to wait for the sites' describe replies")
    preset: str = option("custom", flag=False, help="name of the scenario, for the run store")
    resume: bool = option(False, flag=False, help="continue from the last verified committed round in out")

    def __post_init__(self):
        if self.rounds < 1 or self.expected_nodes < 1:
            raise FedmoeError(f"rounds and expected-sites must be >= 1, got {self.rounds} and {self.expected_nodes}")


# What a deployed coordinator submits when nothing is overridden: pyproject's
# [tool.flwr.app.config] is this, written out (a test keeps the two equal).
def deployed_run_config() -> dict:
    return to_flat(FederationPlan(preset="deployed"))


if __name__ == "__main__":  # print pyproject's [tool.flwr.app.config] section
    import tomli_w

    print("[tool.flwr.app.config]")
    print(tomli_w.dumps(deployed_run_config()), end="")
