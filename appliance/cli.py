"""`appliance` command line: run, demo, doctor, models, catalog, config, experiments, federation."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from appliance.config import ApplianceConfig, default_config, load_config
from appliance.errors import ApplianceError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Edge affect-aware ranking appliance.")
catalog_app = typer.Typer(no_args_is_help=True, help="The title catalog in the local store.")
config_app = typer.Typer(no_args_is_help=True, help="Firmware configs.")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate our models against peers, in the same run.")
app.add_typer(catalog_app, name="catalog")
app.add_typer(config_app, name="config")
experiments_app = typer.Typer(no_args_is_help=True, help="A/B experiments: noised per-arm reports.")
app.add_typer(eval_app, name="eval")
app.add_typer(experiments_app, name="experiments")

ConfigOpt = typer.Option(None, "--config", "-c", help="firmware config YAML (default: embedded CPU-only "
                         "defaults, or $APPLIANCE_CONFIG)")


def _config(path: Path | None) -> ApplianceConfig:
    path = path or (Path(os.environ["APPLIANCE_CONFIG"]) if os.environ.get("APPLIANCE_CONFIG") else None)
    return load_config(path) if path else default_config()


@app.command()
def run(config: Path | None = ConfigOpt) -> None:
    """Run the appliance (supervisor + ranker + vision) until SIGTERM."""
    from appliance.ops.logs import setup_logging
    from appliance.ops.supervisor import run_supervisor

    cfg = _config(config)
    setup_logging("supervisor", cfg=cfg)
    raise typer.Exit(run_supervisor(cfg))


@app.command(hidden=True)
def worker(role: str, config_json: Path = typer.Option(..., "--config-json")) -> None:
    """One appliance process (started by the supervisor)."""
    from appliance.config.schema import validate_config
    from appliance.ops.logs import setup_logging

    cfg = validate_config(json.loads(config_json.read_text()), source=str(config_json))
    setup_logging(role, cfg=cfg)
    if role == "ranker":
        from appliance.serving.process import run_ranker

        raise typer.Exit(run_ranker(cfg))
    if role == "vision":
        from appliance.vision.process import run_vision

        raise typer.Exit(run_vision(cfg))
    raise typer.BadParameter(f"unknown role {role!r}")


@app.command()
def demo(duration: float = typer.Option(20.0, help="seconds of scripted viewing"),
         json_out: Path | None = typer.Option(None, "--json", help="write the run's figures here"),
         config: Path | None = ConfigOpt) -> None:
    """Run the whole appliance with a scripted local player client, and show it live."""
    from appliance.demo.run import run_demo

    raise typer.Exit(run_demo(_config(config), duration, json_out))


@app.command("demo-client", hidden=True)
def demo_client(socket: str = typer.Option(...), duration: float = typer.Option(20.0),
                json_out: Path | None = typer.Option(None, "--json")) -> None:
    """The scripted player (its own process; real gRPC over the Unix socket)."""
    from appliance.demo.client import run_client

    raise typer.Exit(run_client(socket, duration, json_out))


@app.command()
def doctor(json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
           config: Path | None = ConfigOpt) -> None:
    """What this box has: CPU/GPU, ONNX Runtime providers, TensorRT, GStreamer, cameras, config."""
    from appliance.ops.doctor import print_report, run_checks

    report = run_checks(_config(config))
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


@app.command()
def health(config: Path | None = ConfigOpt, timeout: float = typer.Option(2.0)) -> None:
    """Exit 0 when the ranker answers gRPC health SERVING on its socket (container HEALTHCHECK)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    cfg = _config(config)
    channel = grpc.insecure_channel(f"unix:{cfg.path(cfg.serving.unix_socket)}")
    try:
        r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        ok = r.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError as exc:
        print(f"unhealthy: {exc.code().name}", file=sys.stderr)
        ok = False
    finally:
        channel.close()
    raise typer.Exit(0 if ok else 1)


@app.command()
def update(bundle: Path = typer.Option(..., help="signed ranking bundle directory"),
           bundle_version: str = typer.Option(...), image_tag: str = typer.Option(...),
           canary_share: float = typer.Option(1.0, min=0.0, max=1.0),
           trusted_key: Path = typer.Option(..., help="release public key (PEM)"),
           config: Path | None = ConfigOpt) -> None:
    """Roll a signed release onto this box: verify, switch, health-check, roll back on failure."""
    from appliance.ops.bucketing import box_id
    from appliance.ops.updater import Release, Updater, ranker_bundle_healthy

    cfg = _config(config)
    data = Path(cfg.path("{data_dir}"))
    up = Updater(data / "ranker-releases", trusted_key.read_bytes(), box_id(data), ranker_bundle_healthy)
    result = up.apply(Release(image_tag, bundle_version, canary_share), bundle)
    print(f"{result.outcome}: current={result.current} {result.detail}".rstrip())
    raise typer.Exit(0 if result.outcome in ("switched", "skipped", "already_current") else 1)


@catalog_app.command("import")
def catalog_import(csv_path: Path, replace: bool = typer.Option(False, help="drop titles not in the file"),
                   config: Path | None = ConfigOpt) -> None:
    """Import a MovieLens-style catalog (movieId,title,genres[,maturity]) into the local store."""
    from appliance.ranking import parse_catalog_csv
    from appliance.store import Store

    cfg = _config(config)
    rows = parse_catalog_csv(csv_path)
    store = Store(cfg.path(cfg.store.db_path))
    n = store.import_catalog(((r.item_id, r.title, "|".join(r.genres), r.year, r.maturity) for r in rows),
                             replace=replace)
    print(f"imported {n} titles into {store.path} (catalog now {store.catalog_count()} titles)")


@config_app.command("check")
def config_check(files: list[Path]) -> None:
    """Validate firmware configs; exit 1 naming the bad field when one is invalid."""
    bad = 0
    for f in files:
        try:
            cfg = load_config(f)
            print(f"ok   {f} ({cfg.device_class})")
        except ApplianceError as exc:
            bad += 1
            print(f"FAIL {exc}", file=sys.stderr)
    raise typer.Exit(1 if bad else 0)


@experiments_app.command("report")
def experiments_report(name: str = typer.Argument(..., help="experiment name in the config"),
                       config: Path | None = ConfigOpt) -> None:
    """This box's DP report of an experiment (whole days since its last one) as JSON on stdout; exit 3 when
    there is no new whole day. Spends the report's epsilon in the box's ledger."""
    from appliance.experiments import make_report
    from appliance.store import Store

    cfg = _config(config)
    exp = next((e for e in cfg.experiments if e.name == name), None)
    if exp is None:
        raise ApplianceError(f"no experiment {name!r} in the config (have: {[e.name for e in cfg.experiments]})")
    store = Store(cfg.path(cfg.store.db_path))
    try:
        report = make_report(store, exp)
    finally:
        store.close()
    if report is None:
        print(f"experiment {name}: no new whole day to report", file=sys.stderr)
        raise typer.Exit(3)
    print(json.dumps(report))


@eval_app.command("emotion")
def eval_emotion(data_dir: Path = typer.Argument(..., help="labelled folder DIR/<class>/*.png|jpg (FER2013 names)"),
                 json_out: Path | None = typer.Option(None, "--json"),
                 peer: bool = typer.Option(True, help="also run the `fer` package on the same images"),
                 model: str | None = typer.Option(None, help="manifest entry taken as ours (default: the "
                                                  "product's emotion model)")) -> None:
    """Top-1, macro-F1, per-class recall and confusion of our classifier and of the `fer` package."""
    from appliance.evaluation.emotion import run as run_eval

    run_eval(data_dir, json_out, with_peer=peer, model=model)


@eval_app.command("ranking")
def eval_ranking(interactions: Path = typer.Option(..., help="userId,movieId,rating,timestamp CSV"),
                 catalog: Path = typer.Option(..., help="movieId,title,genres CSV"),
                 json_out: Path | None = typer.Option(None, "--json")) -> None:
    """Leave-last-out HR/NDCG@10/20 of our ranker and the baselines, same split, same run."""
    from appliance.evaluation.ranking import run as run_eval

    run_eval(interactions, catalog, json_out)


federation_app = typer.Typer(no_args_is_help=True, help="Federated fine-tuning (Flower, SecAgg+, DP).")
app.add_typer(federation_app, name="federation")


@federation_app.command("simulate")
def federation_simulate(
        interactions: Path = typer.Option(Path("../shared/datasets/movielens-small/ratings.csv"),
                                          help="userId,movieId,rating,timestamp CSV: one box per user"),
        bundle: Path = typer.Option(Path("models/ranker"), help="reference bundle: its catalog (content "
                                    "metadata) is what the panel start is trained over"),
        start_bundle: Path | None = typer.Option(None, help="start from this bundle instead of training the "
                                                 "panel start (tests; a bundle trained on everyone leaks)"),
        panel_share: float = typer.Option(0.2, help="share of users in the central opted-in panel"),
        nodes: int | None = typer.Option(None, help="boxes (default: every user)"),
        rounds: int = typer.Option(20), epsilon: float = typer.Option(2.0), delta: float = typer.Option(1e-5),
        clip: float = typer.Option(0.25, help="L2 bound C of one box's update"),
        cohort: int | None = typer.Option(None, help="boxes per round (default: all)"),
        compression: float = typer.Option(12.0, help="dense float32 bytes / SecAgg+ update payload"),
        pack: int = typer.Option(2, help="quantised values packed per SecAgg+ integer (1: no packing)"),
        always_popular: int = typer.Option(300, help="biases of the panel's N most watched titles in every round"),
        federated_titles: int = typer.Option(0, help="federate only the biases of the panel's N most watched titles "
                                             "(0: all); the others stay at the start's values"),
        always_adapter: bool = typer.Option(False, help="the query adapter's coordinates in every round"),
        lr: float = typer.Option(5.0, help="boxes' local step on the title biases"),
        lr_adapter: float = typer.Option(0.05, help="boxes' local step on the query adapter"),
        lr_features: float = typer.Option(0.5, help="boxes' local step on the title-feature weights"),
        local_epochs: int = typer.Option(2),
        server_lr: float = typer.Option(0.05, help="server step on the noisy mean update (adam: at most about this "
                                        "much per coordinate and round; sgd multiplies the mean by it, 5 was its default)"),
        server_shrink: float = typer.Option(0.0, help="soft threshold on the noisy mean, in noise std"),
        server_lr_adapter: float = typer.Option(-1.0, help="server step on the adapter (< 0: server-lr)"),
        server_lr_features: float = typer.Option(-1.0, help="server step on the feature weights (< 0: server-lr; "
                                                 "0: they stay at the start)"),
        server_opt: str = typer.Option("adam", help="server optimiser on the noisy mean: sgd, momentum, adam"),
        server_beta1: float = typer.Option(0.9, help="server momentum / Adam first-moment decay"),
        server_beta2: float = typer.Option(0.99, help="server Adam second-moment decay"),
        server_tau: float = typer.Option(1.0, help="server Adam adaptivity, in noise std of the round"),
        average_from: int = typer.Option(0, help="publish the mean of the heads after rounds >= this (0: last)"),
        dropout: float = typer.Option(0.0, help="share of boxes that drop after sharing keys"),
        seed: int = typer.Option(0),
        json_out: Path | None = typer.Option(None, "--json")) -> None:
    """Fleet-size federated run in one process (real Flower ServerApp/ClientApps, no Ray); prints JSON."""
    from appliance.federation.simulate import simulate, write_json

    result = simulate(interactions, bundle, nodes=nodes, rounds=rounds, epsilon=epsilon, delta=delta,
                      clip=clip, cohort=cohort, compression=compression, pack=pack, always_popular=always_popular, federated_titles=federated_titles,
                      always_adapter=always_adapter, lr=lr, lr_adapter=lr_adapter,
                      lr_features=lr_features, local_epochs=local_epochs, server_lr=server_lr, server_shrink=server_shrink,
                      server_lr_adapter=server_lr_adapter, server_lr_features=server_lr_features, server_opt=server_opt, server_beta1=server_beta1, server_beta2=server_beta2,
                      server_tau=server_tau, average_from=average_from,
                      panel_share=panel_share, start_bundle=start_bundle, dropout=dropout, seed=seed,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    write_json(result, json_out)
    print(json.dumps(result, indent=2))


def _mount_models() -> None:
    try:
        from appliance.models.cli import app as models_app
    except ImportError:  # pragma: no cover - only while the package is half-built
        return
    app.add_typer(models_app, name="models", help="Build and verify the ONNX models.")


_mount_models()


def main() -> None:
    try:
        app()
    except ApplianceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
