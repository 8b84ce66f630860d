"""Federated fine-tuning of the ranking head on Flower: SecAgg+, client-side clipping, central DP noise.

Flower 1.41 runs secure aggregation only through its legacy API, so this is the documented
combination (Flower's `fl-dp-sa` example), adapted to what the appliance needs:

ClientApp (one per box)
    mods = [secaggplus_mod, packing_mod, fixedclipping_mod]: SecAgg+ outermost, clipping next to the
    box's own code. The box receives the global head as bytes in the round's config, trains on its own
    history, and returns only this round's aligned coordinate subset of its delta (k numbers,
    `model.round_subset`). The FitIns parameters are k zeros, so `fixedclipping_mod` (which clips
    result - FitIns) clips exactly the delta sub-vector to L2 norm C.
    pack = 1: every value SecAgg+ quantises lies in [-C, C] (clipping_range = C: SecAgg+'s own value
    clipping never bites) and `packing_mod` passes the update through.
    pack = F > 1 (`packing`): `packing_mod` quantises the clipped sub-vector itself (dequantised L2 norm
    still <= C) and packs F values per SecAgg+ integer; SecAgg+ is set up to carry those integers 1:1
    (quantiser scale 1.0, modulus above the cohort's sum), so a round moves F times the coordinates for
    the same upload, and the server unpacks the exact integer sum before it adds the noise.
    `num_examples` is always 1 and `max_weight` 1 (a larger max_weight scales values down before
    quantisation and loses precision); no metrics are returned (the server would see them unmasked).

ServerApp (the cloud aggregator)
    DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...)) over a legacy strategy:
    `SubsetFedAvg` (FedAvg: samples a fixed-size cohort, builds the FitIns, scatters the update back
    into the head) wrapped by `FleetDP`, a `DifferentialPrivacyClientSideFixedClipping` that
      - calibrates z with `accounting.calibrate_noise` for the run's (epsilon, delta, rounds, cohort,
        population) and spends a `PrivacyLedger` round by round: no round starts that would overspend;
      - adds N(0, (z C / m)^2) to the mean of the m boxes that made it through SecAgg+, where m counts
        the survivors, not the sampled (Flower's wrapper returns nothing when any box drops and scales
        by the sampled count; a dropout is normal on a fleet); with `sampling = "full"` (every box in
        every round) it releases (sum + N(0, (z C)^2)) / m with m the planned cohort instead, the fixed
        denominator that full participation is accounted with (`accounting`);
      - draws its noise from the OS's entropy, not from a seedable generator.
    `SubsetFedAvg.apply` then hands the noised mean to the server optimiser (`server_opt`: sgd, FedAvgM
    momentum or FedAdam with per-coordinate state; optional tail averaging of the heads): post-processing
    of the release, so it costs no privacy.
    Every wait is bounded: SecAgg+ stage timeout, cohort wait, round timeout.

Accounting note: packing changes the encoding, not the mechanism: the sum the server unpacks is the sum
of the boxes' dequantised updates, each of L2 norm <= C, and the noise is N(0, (z C)^2) on that sum as
without packing. Noise is calibrated for the planned cohort; a round that loses boxes still adds noise
of standard deviation z*C to their sum, so each round is the accounted mechanism (or better).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app.message_type import MessageType
from flwr.client import NumPyClient
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (
    Context,
    FitIns,
    FitRes,
    Parameters,
    log,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from appliance.federation import packing
from appliance.federation.accounting import PrivacyLedger, calibrate_noise
from appliance.federation.model import (
    HeadShape,
    client_update,
    lr_vector,
    n_federated,
    round_subset,
    subset_size,
)
from appliance.federation.segments import secure_rng
from appliance.federation.server_opt import ServerOptimizer

SECAGG_MODULUS = 2**32
SHARE_FIELDS = ("num_shares", "reconstruction_threshold")


@dataclass
class RunSettings:
    """One federated run; every field is a Flower run-config key (dashes for underscores)."""

    rounds: int = 3                    # rounds planned (noise calibrated for them) or, with a given
    noise_multiplier: float = 0.0      # noise multiplier z > 0, the most rounds: the budget stops the run
    epsilon: float = 2.0
    delta: float = 1e-5
    clip: float = 0.1                  # C: L2 bound of one box's (sub-vector) update
    population: int = 3                # N boxes the cohort is drawn from (accounting)
    cohort: int = 3                    # m boxes per round (fixed size, without replacement)
    sampling: str = "fixed_size"      # or "full": cohort == population, fixed denominator (accounting)
    compression: float = 16.0          # dense float32 bytes of the head / SecAgg+ upload bytes
    pack: int = 1                      # quantised values per SecAgg+ integer (`packing`; 1: Flower's own quantisation)
    always_rows: str = ""              # comma-separated title rows whose biases are in every round's subset (public)
    federated_rows: str = ""           # comma-separated title rows whose biases are federated ("": all; public)
    run_seed: int = 0                  # public: the rounds' coordinate subsets derive from it
    server_lr: float = 1.0             # the server's step on the noisy mean update
    server_shrink: float = 0.0         # soft-threshold the noisy mean at this many noise std (0: off)
    server_lr_adapter: float = -1.0    # the server's step on the adapter's coordinates (< 0: server_lr)
    server_lr_features: float = -1.0   # ... and on the feature weights' (< 0: server_lr; 0: w stays at the start)
    server_opt: str = "sgd"            # the server's optimiser on the release: sgd | momentum | adam (`server_opt`)
    server_beta1: float = 0.9          # momentum / Adam's first moment
    server_beta2: float = 0.99         # Adam's second moment
    server_tau: float = 1.0            # Adam's adaptivity, in noise std of the round
    average_from: int = 0              # publish the mean of the heads after rounds >= this (0: the last head)
    num_shares: float | int = 1.0      # SecAgg+: float = share of the cohort, int = count of boxes
    reconstruction_threshold: float | int = 0.5  # each box's secrets are split among / needed to rebuild
    quantization_range: int = 2**22
    timeout: float = 30.0              # seconds per SecAgg+ stage and for the cohort to be there
    n_items: int = 0
    dim: int = 0
    rank: int = 4
    n_feat: int = 0                    # public title features the head's w weighs (0: no w)
    head_seed: int = 0
    start: str = ""                    # .npy of the start head ("" = identity head from head_seed)
    lr: float = 0.5                    # the boxes' local SGD step on the title biases
    lr_adapter: float = 0.05           # ... and on the query adapter (it moves every score at once)
    lr_features: float = 0.5           # ... and on the feature weights w
    local_epochs: int = 2
    batch: int = 64
    out_dir: str = ""                  # where the server writes result.json and head.npy

    @classmethod
    def from_run_config(cls, cfg: dict[str, Any]) -> RunSettings:
        known = {f: type(getattr(cls(), f)) for f in cls.__dataclass_fields__}
        kw = {}
        for key, value in cfg.items():
            name = key.replace("-", "_")
            if name in SHARE_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool):
                kw[name] = value  # SecAgg+ reads an int as a count and a float as a share of the cohort
            elif name in known:
                kw[name] = known[name](value)
        return cls(**kw)

    def to_run_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @property
    def shape(self) -> HeadShape:
        return HeadShape(self.n_items, self.dim, self.rank, self.n_feat)

    @property
    def fixed(self) -> np.ndarray | None:
        return np.array([int(r) for r in self.always_rows.split(",")], dtype=np.int64) if self.always_rows else None

    @property
    def frozen(self) -> np.ndarray | None:
        """The title biases outside `federated_rows`: never trained, sent nor updated (None: all federated)."""
        if not self.federated_rows:
            return None
        fed = np.array([int(r) for r in self.federated_rows.split(",")], dtype=np.int64)
        return np.setdiff1d(np.arange(self.n_items), fed)


@dataclass
class RoundRecord:
    round: int
    sampled: int
    survivors: int      # boxes whose masked update is in the aggregate
    dropped: int        # sampled - survivors (Flower's failure list counts a box twice, so not that)
    epsilon: float      # cumulative, after this round
    noise_std: float    # per coordinate, on the mean


@dataclass
class RunResult:
    settings: dict[str, Any]
    noise_multiplier: float
    federated_params: int
    subset_k: int                      # coordinates of the head a round moves
    rounds: list[RoundRecord] = field(default_factory=list)
    stopped: str = ""
    seconds: float = 0.0
    head: np.ndarray | None = field(default=None, repr=False)  # the final head (written as head.npy)
    upload_ints: int = 0               # SecAgg+ coordinates a box uploads for them (subset_k / pack, + 1 weight not counted)

    @property
    def epsilon(self) -> float:
        return self.rounds[-1].epsilon if self.rounds else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("head")
        d["epsilon"] = self.epsilon
        return d


# --------------------------------------------------------------------------------------------- client


class HeadClient(NumPyClient):
    """One box: its own (query, next title) examples and the bundle's item table and title features;
    nothing else. `base` (queries @ items.T, optional) is the frozen part of the box's logits, kept
    between rounds."""

    def __init__(self, queries: np.ndarray, targets: np.ndarray, items: np.ndarray,
                 base: np.ndarray | None = None, features: np.ndarray | None = None) -> None:
        self.queries, self.targets, self.items, self.base = queries, targets, items, base
        self.features = features

    def get_parameters(self, config):  # the server always brings the start head
        return []

    def fit(self, parameters, config):
        shape = HeadShape(int(config["n-items"]), int(config["dim"]), int(config["rank"]), int(config["n-feat"]))
        if self.items.shape != (shape.n_items, shape.dim):
            raise ValueError(f"head expects items {shape.n_items}x{shape.dim}, box has {self.items.shape}")
        theta = np.frombuffer(config["global"], dtype=np.float32).astype(np.float64)
        k = int(config["k"])
        if theta.shape != (shape.n_params,) or len(parameters) != 1 or parameters[0].shape != (k,):
            raise ValueError("round instructions do not match the head")
        server_round = int(config["round"])
        fixed = np.frombuffer(config["fixed"], dtype=np.int32).astype(np.int64) if config.get("fixed") else None
        frozen = np.frombuffer(config["frozen"], dtype=np.int32).astype(np.int64) if config.get("frozen") else None
        sub, _ = client_update(shape, theta, self.queries, self.targets, self.items,
                               server_round=server_round, run_seed=int(config["run-seed"]), k=k, fixed=fixed,
                               frozen=frozen,
                               clip=float(config["clipping_norm"]), lr=float(config["lr"]),
                               lr_adapter=float(config["lr-adapter"]), lr_features=float(config["lr-features"]),
                               epochs=int(config["local-epochs"]), batch=int(config["batch"]), seed=server_round,
                               base=self.base, features=self.features)
        return [sub], 1, {}  # weight 1 (SecAgg+ max_weight 1), no metrics: the server sees them in clear

    def evaluate(self, parameters, config):  # no federated evaluation: a loss is a signal about the box
        return 0.0, 1, {}


def load_node_data(node_config: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The box's examples (`data`: .npz with queries [n, d] and targets [n]) and item table (`items`)."""
    with np.load(str(node_config["data"])) as z:
        queries, targets = z["queries"], z["targets"]
    items = np.load(str(node_config["items"]))
    return queries, targets, items


def packing_mod(msg, ctxt: Context, call_next):
    """Between SecAgg+ and clipping: when the round asks for it (config `pack-fields` > 1), quantise the
    box's *clipped* sub-vector and pack `pack-fields` values per SecAgg+ integer (`packing.encode`);
    the dequantised vector that enters the sum keeps L2 norm <= the clipping norm, so the DP noise and
    the accounting are those of the unpacked update. Anything else passes through untouched."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    fit_ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    fields = int(fit_ins.config.get("pack-fields", 1))
    out = call_next(msg, ctxt)
    if fields <= 1 or out.has_error():
        return out
    clip = float(fit_ins.config[KEY_CLIPPING_NORM])
    spec = packing.plan(fields, int(fit_ins.config["pack-boxes"]), clip)
    fit_res = compat.recorddict_to_fitres(out.content, keep_input=True)
    (update,) = parameters_to_ndarrays(fit_res.parameters)
    fit_res.parameters = ndarrays_to_parameters([packing.encode(update, spec, clip, secure_rng())])
    out.content = compat.fitres_to_recorddict(fit_res, keep_input=True)
    return out


def make_client_app(data_fn=load_node_data, outer_mods=()) -> ClientApp:
    """ClientApp whose box data comes from `data_fn(node_config)`; SecAgg+ first, then packing (a no-op
    unless the round asks for it), then clipping. `outer_mods` go before SecAgg+ (they see what leaves
    the box: meters, fault injection in tests)."""

    def client_fn(context: Context):
        return HeadClient(*data_fn(context.node_config)).to_client()

    return ClientApp(client_fn=client_fn, mods=[*outer_mods, secaggplus_mod, packing_mod, fixedclipping_mod])


# --------------------------------------------------------------------------------------------- server


def soft_threshold(x: np.ndarray, lam: float) -> np.ndarray:
    """sign(x) * max(|x| - lam, 0); the identity for lam <= 0."""
    if lam <= 0:
        return np.asarray(x, dtype=np.float64)
    return np.sign(x) * np.maximum(np.abs(x) - lam, 0.0)


def server_lrs(s: RunSettings) -> float | np.ndarray:
    """The server's step size: one number, or one per parameter when the adapter's or the feature
    weights' differ from the biases' (`server_lr_adapter`, `server_lr_features`; < 0: server_lr)."""
    return part_lrs(s.shape, s.server_lr, s.server_lr_adapter, s.server_lr_features)


def part_lrs(shape: HeadShape, lr: float, lr_adapter: float, lr_features: float) -> float | np.ndarray:
    """lr, or one step size per parameter where the adapter's / feature weights' are set (>= 0)."""
    if lr_adapter < 0 and lr_features < 0:
        return lr
    return lr_vector(shape, lr, lr if lr_adapter < 0 else lr_adapter, lr if lr_features < 0 else lr_features)


class SubsetFedAvg(FedAvg):
    """FedAvg over this round's aligned coordinate subset of the head, on a fixed-size cohort."""

    def __init__(self, settings: RunSettings, theta0: np.ndarray) -> None:
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=settings.cohort,
                         min_evaluate_clients=0, min_available_clients=settings.cohort,
                         initial_parameters=ndarrays_to_parameters([theta0]), accept_failures=True)
        self.settings = settings
        self.shape = settings.shape
        self.frozen = settings.frozen
        self.k = subset_size(n_federated(self.shape, self.frozen), settings.compression, settings.pack)
        self.spec = packing.plan(settings.pack, settings.cohort, settings.clip) if settings.pack > 1 else None
        if self.spec is not None:
            packing.check_norm_room(self.spec, self.k, settings.clip)
        self.upload_ints = self.spec.packed_len(self.k) if self.spec else self.k  # SecAgg+ coordinates (+1 weight)
        self.theta = np.asarray(theta0, dtype=np.float64)
        self.last_sampled = 0
        self.opt = ServerOptimizer(self.shape.n_params, kind=settings.server_opt, lr=server_lrs(settings),
                                   beta1=settings.server_beta1, beta2=settings.server_beta2, tau=settings.server_tau,
                                   average_from=settings.average_from)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        s = self.settings
        self.theta = parameters_to_ndarrays(parameters)[0].astype(np.float64)
        # num_available() refreshes Flower's node list from the grid first (wait_for alone would sleep
        # until the next 5 s poll of the legacy client-manager thread)
        if client_manager.num_available() < s.cohort and not client_manager.wait_for(s.cohort, timeout=max(1, math.ceil(s.timeout))):
            log(WARNING, "round %s: fewer than %s boxes online after %ss, round skipped", server_round,
                s.cohort, s.timeout)
            self.last_sampled = 0
            return []
        clients = client_manager.sample(num_clients=s.cohort, min_num_clients=s.cohort)
        config = {
            "round": server_round, "k": self.k, "run-seed": s.run_seed,
            "n-items": s.n_items, "dim": s.dim, "rank": s.rank, "n-feat": s.n_feat,
            "lr": s.lr, "lr-adapter": s.lr_adapter, "lr-features": s.lr_features, "local-epochs": s.local_epochs, "batch": s.batch,
            "global": self.theta.astype(np.float32).tobytes(),
            "pack-fields": s.pack, "pack-boxes": s.cohort,
        }
        if s.fixed is not None:
            config["fixed"] = s.fixed.astype(np.int32).tobytes()
        if self.frozen is not None:
            config["frozen"] = self.frozen.astype(np.int32).tobytes()
        ins = FitIns(ndarrays_to_parameters([np.zeros(self.k)]), config)
        self.last_sampled = len(clients)
        return [(c, ins) for c in clients]

    def apply(self, server_round: int, mean_update: np.ndarray, noise_std: float = 0.0) -> np.ndarray:
        """theta[subset] <- the server optimiser's step on shrink(noisy mean) (`server_opt`; sgd:
        theta[subset] += server_lr * shrink(noisy mean)). The soft threshold (at server_shrink noise
        std, a public number) and the optimiser are post-processing of the DP release: the threshold
        zeroes the coordinates where the mean is indistinguishable from noise (titles few boxes
        watched) and keeps the rest."""
        idx = round_subset(self.shape.n_params, self.k, server_round, self.settings.run_seed,
                           always=self.shape.n_feat, fixed=self.settings.fixed, frozen=self.frozen)
        u = soft_threshold(mean_update, self.settings.server_shrink * noise_std)
        self.theta = self.opt.step(self.theta, idx, u, server_round, noise_std)
        return self.theta

    @property
    def published(self) -> np.ndarray:
        """The head the run publishes (the tail average of the heads when `average_from` is set)."""
        return self.opt.published(self.theta)


Audit = Callable[[int, list[np.ndarray]], None]
"""(round, the update of every result the strategy received): all that the server-side code ever gets
from the boxes (with SecAgg+, every entry is the same unmasked mean; the wire test checks that)."""


class FleetDP(DifferentialPrivacyClientSideFixedClipping):
    """Central Gaussian noise on the securely aggregated mean; budget-bounded; survives dropouts."""

    def __init__(self, strategy: SubsetFedAvg, ledger: PrivacyLedger, clip: float, rng=None,
                 audit: Audit | None = None) -> None:
        super().__init__(strategy, noise_multiplier=ledger.noise_multiplier, clipping_norm=clip,
                         num_sampled_clients=ledger.cohort)
        self.audit = audit
        self.inner = strategy
        self.ledger = ledger
        self.rng = rng if rng is not None else secure_rng()
        self.records: list[RoundRecord] = []
        self.stopped = ""

    def configure_fit(self, server_round, parameters, client_manager):
        if not self.ledger.can_run_round():
            if not self.stopped:
                log(INFO, "privacy budget spent after %s rounds (epsilon %.3f): stopping",
                    self.ledger.rounds_done, self.ledger.spent())
            self.stopped = "budget"
            return []
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results: list[tuple[ClientProxy, FitRes]], failures):
        if not results:
            return None, {}
        if any(res.num_examples != 1 for _, res in results):
            raise ValueError("every box must report weight 1 (SecAgg+ max_weight 1)")
        if self.audit is not None:
            self.audit(server_round, [parameters_to_ndarrays(res.parameters)[0] for _, res in results])
        # SecAgg+ hands every surviving box's FitRes the same unmasked mean of the survivors' updates
        mean = parameters_to_ndarrays(results[0][1].parameters)[0].astype(np.float64)
        m = len(results)
        if self.inner.spec is not None:
            # packed: SecAgg+'s "mean" is that of the packed integers; unpack the exact integer sum into
            # the sum of the boxes' dequantised updates (each of L2 norm <= C, `packing.encode`), so
            # the noise below is calibrated to the same sensitivity C as without packing
            mean = packing.unpack_mean(mean, m, self.inner.k, self.inner.spec) / m
        # full participation: the sum over the fixed, public denominator (the planned cohort), so that
        # one box more or less moves the release by at most C / denominator (accounting, "full")
        denominator = self.ledger.cohort if self.ledger.sampling == "full" else m
        std = self.noise_multiplier * self.clipping_norm / denominator
        noisy = mean * (m / denominator) + self.rng.normal(0.0, std, size=mean.shape)
        eps = self.ledger.record_round()
        theta = self.inner.apply(server_round, noisy, std)
        rec = RoundRecord(server_round, self.inner.last_sampled, m, self.inner.last_sampled - m, eps, std)
        self.records.append(rec)
        log(INFO, "round %s: %s of %s boxes aggregated, noise std %.3g, epsilon so far %.4f",
            server_round, m, self.inner.last_sampled, std, eps)
        return ndarrays_to_parameters([theta]), {"epsilon": eps, "survivors": m}


def secagg_workflow(s: RunSettings) -> SecAggPlusWorkflow:
    if s.pack > 1:
        # packed integers: SecAgg+ must map each one 1:1 (quantiser scale 1.0) and sum them without wrap
        ranges = packing.plan(s.pack, s.cohort, s.clip).secagg_ranges()
        return SecAggPlusWorkflow(num_shares=s.num_shares, reconstruction_threshold=s.reconstruction_threshold,
                                  max_weight=1.0, timeout=s.timeout, **ranges)
    if (s.cohort + 1) * s.quantization_range >= SECAGG_MODULUS:
        raise ValueError(f"a cohort of {s.cohort} overflows SecAgg+'s 2^32 modulus at quantization range "
                         f"{s.quantization_range}: lower quantization_range")
    return SecAggPlusWorkflow(num_shares=s.num_shares, reconstruction_threshold=s.reconstruction_threshold,
                              max_weight=1.0, clipping_range=s.clip, quantization_range=s.quantization_range,
                              modulus_range=SECAGG_MODULUS, timeout=s.timeout)


def run_server(grid: Grid, context: Context, rng=None, audit: Audit | None = None) -> RunResult:
    """The ServerApp's body; returns (and writes to `out-dir`, if set) what the run did. `audit` sees
    what the strategy receives from the boxes, round by round."""
    t0 = time.monotonic()
    s = RunSettings.from_run_config(dict(context.run_config))
    if s.n_items <= 0 or s.dim <= 0:
        raise ValueError("run config needs n-items and dim of the bundle's item table")
    if s.cohort > s.population:
        raise ValueError("cohort larger than population")
    if s.sampling == "full" and s.cohort != s.population:
        raise ValueError("full participation asks every box every round: cohort must equal population")
    z = s.noise_multiplier or calibrate_noise(s.epsilon, s.delta, s.rounds, s.sampling, s.population, s.cohort)
    ledger = PrivacyLedger(z, s.delta, s.epsilon, s.sampling, s.population, s.cohort)
    theta0 = np.load(s.start) if s.start else s.shape.initial(seed=s.head_seed)
    inner = SubsetFedAvg(s, theta0)
    strategy = FleetDP(inner, ledger, s.clip, rng=rng, audit=audit)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=s.rounds, round_timeout=s.timeout * 4),
                           strategy=strategy)
    DefaultWorkflow(fit_workflow=secagg_workflow(s))(grid, legacy)
    result = RunResult(settings=asdict(s), noise_multiplier=z, federated_params=n_federated(s.shape, s.frozen),
                       subset_k=inner.k, upload_ints=inner.upload_ints, rounds=strategy.records, stopped=strategy.stopped,
                       seconds=round(time.monotonic() - t0, 3), head=inner.published)
    if s.out_dir:
        out = Path(s.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "head.npy", result.head)
        (out / "result.json").write_text(json.dumps(result.to_json(), indent=2))
    return result


def make_server_app() -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, context)

    return app


# Components for `flwr run` (pyproject: [tool.flwr.app.components]).
client_app = make_client_app()
server_app = make_server_app()
