"""The commands about a trained model: evaluate, predict, export, serve, report, and models.

A UserError from anywhere below is reported by the command group (app.py): one line, exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from inat_finetune.cli.app import console, out
from inat_finetune.cli.options import field_option
from inat_finetune.runfiles import check_output_file
from inat_finetune.runtime.extras import require_extra

RunOrCheckpoint = Annotated[
    Path,
    typer.Argument(
        help="a run directory, a .ckpt file, or a folder from export --format safetensors"
    ),
]


DataOpt = field_option("data")


TtaFlag = Annotated[
    bool, typer.Option("--tta", help="average with the mirrored image (2x the compute)")
]


def evaluate(
    run_or_ckpt: RunOrCheckpoint,
    data: DataOpt = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    num_workers: Annotated[int | None, typer.Option(min=0)] = None,
    accelerator: Annotated[str, typer.Option()] = "auto",
    precision: Annotated[str, typer.Option()] = "auto",
    save: Annotated[
        Path | None, typer.Option("--save", help="write the result as JSON here")
    ] = None,
    tta: TtaFlag = False,
    multi_crop: Annotated[
        bool,
        typer.Option("--multi-crop", help="centre + 4 corner crops, each mirrored (10x)"),
    ] = False,
) -> None:
    """Re-score a saved model on a test set (default: the run's own test split)."""
    from inat_finetune.inference.evaluation import evaluate as run_evaluation
    from inat_finetune.inference.evaluation import save_evaluation

    mode = "multicrop" if multi_crop else "flip" if tta else "none"
    check_output_file(save, "--save", "evaluation.json")
    result = run_evaluation(
        run_or_ckpt, data, batch_size, num_workers, accelerator, precision, tta=mode
    )
    if save is not None:
        save_evaluation(result, save)
    out.print(
        f"test accuracy: {100 * result['test_acc']:.2f}% on {result['num_test_images']} images"
        + ("" if mode == "none" else f" (test-time augmentation: {mode})")
    )
    out.print(json.dumps(result["per_class_test_acc"], indent=2))


def list_backbones(
    all_models: Annotated[
        bool, typer.Option("--all", help="list every torchvision and timm model")
    ] = False,
) -> None:
    """List backbones and whether their ImageNet weights are available on this machine."""
    from inat_finetune.models.backbones import (
        FEATURED_BACKBONES,
        list_models,
        resolve_source,
        weights_availability,
    )

    if all_models:
        for name in list_models(include_all=True):
            out.print(name)
        return
    table = Table(title="Backbones (any torchvision or timm classifier name also works)")
    for column in ("backbone", "source", "default weights", "weights here"):
        table.add_column(column)
    for name in list_models():
        source, _ = resolve_source(name)
        table.add_row(name, source, FEATURED_BACKBONES[name], weights_availability(name))
    out.print(table)


def report_command(
    run_dir: Annotated[Path, typer.Argument(help="a run directory or a comparison directory")],
) -> None:
    """Write RUN_DIR/report.html: one self-contained page with the config, data, and results."""
    from inat_finetune.reporting.report import write_report

    out.print(f"wrote {write_report(run_dir)}")


def _print_predictions(report: Any, top_k: int) -> None:
    table = Table(title=f"Predictions ({len(report.predictions)} images)")
    table.add_column("path", overflow="fold")
    table.add_column("top class")
    table.add_column("probability", justify="right")
    if top_k > 1:
        table.add_column("next")
    for p in report.predictions:
        row = [p.path, p.top[0][0], f"{100 * p.top[0][1]:.1f}%"]
        if top_k > 1:
            row.append(", ".join(f"{c} {100 * prob:.1f}%" for c, prob in p.top[1:]))
        table.add_row(*row)
    out.print(table)
    if report.skipped:
        skipped = Table(title=f"Skipped ({len(report.skipped)} files)")
        skipped.add_column("path", overflow="fold")
        skipped.add_column("reason")
        for s in report.skipped:
            skipped.add_row(s.path, s.reason)
        out.print(skipped)


def predict(
    run_or_ckpt: RunOrCheckpoint,
    paths: Annotated[
        list[Path], typer.Argument(help="image files and folders (searched recursively)")
    ],
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="classes listed per image")] = 5,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="also write the predictions as JSON here")
    ] = None,
    csv_out: Annotated[
        Path | None, typer.Option("--csv", help="also write the predictions as CSV here")
    ] = None,
    tta: TtaFlag = False,
    batch_size: Annotated[int, typer.Option(min=1, help="images per forward pass")] = 32,
) -> None:
    """Classify photos: top-k classes with probabilities for every image found."""
    from inat_finetune.inference.predict import predict_paths, write_csv, write_json

    check_output_file(json_out, "--json", "predictions.json")
    check_output_file(csv_out, "--csv", "predictions.csv")
    report = predict_paths(run_or_ckpt, paths, top_k=top_k, batch_size=batch_size, tta=tta)
    _print_predictions(report, top_k)
    for target, writer in ((json_out, write_json), (csv_out, write_csv)):
        if target is not None:
            out.print(f"wrote {writer(report, target)}")


def export_model(
    run_or_ckpt: RunOrCheckpoint,
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="onnx, torchscript, or safetensors (a folder: model.safetensors and config.json; "
            "load() reads it, and timm.create_model('local-dir:FOLDER', pretrained=True) too for "
            "timm backbones; torchvision backbones such as resnet50 and mobilenet_v2 load "
            "through inat-finetune only)",
        ),
    ] = "onnx",  # noqa: A002
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            help=escape(
                "a folder [default: <run>/export], or for onnx/torchscript the .onnx/.pt file "
                "itself (its preprocessing JSON beside it: model.onnx -> "
                "model.preprocessing.json)"
            ),
        ),
    ] = None,
) -> None:
    """Export for other runtimes (dynamic batch), with the preprocessing JSON beside the model."""
    from inat_finetune.inference.export import check_export_output, export

    check_export_output(output, format)
    result = export(run_or_ckpt, format=format, output=output)
    written = [result.model_path, result.config_path, result.preprocessing_path]
    for path in written:
        if path is not None:
            out.print(f"wrote {path}", soft_wrap=True)
    out.print(f"checked against PyTorch: max abs difference on logits {result.max_abs_diff:.2e}")


def serve(
    run_or_ckpt: RunOrCheckpoint,
    host: Annotated[
        str, typer.Option(help="address to bind; anything but loopback exposes the model")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free port)")] = 7860,
    max_upload_mb: Annotated[
        float, typer.Option("--max-upload-mb", min=0.001, help="largest upload accepted")
    ] = 10.0,
    max_megapixels: Annotated[
        float, typer.Option("--max-megapixels", min=0.001, help="largest image accepted")
    ] = 40.0,
) -> None:
    """A web page to try the model on a photo (upload or drop), and a JSON API at /api/predict."""
    require_extra("serve", "serve")
    from inat_finetune.inference.serve import bind, create_app, is_loopback, run_server

    # Bound before the checkpoint loads and before "serving on" is printed: an invalid or
    # busy port is one line at once.
    sock = bind(host, port)
    try:
        web_app = create_app(run_or_ckpt, max_upload_mb, max_megapixels)
    except BaseException:
        sock.close()
        raise
    if not is_loopback(host):
        console.print(
            f"[yellow]warning:[/] --host {host} is not loopback: anyone who can reach this "
            "machine can use the model"
        )
    out.print(f"serving on http://{host}:{sock.getsockname()[1]}/ (Ctrl+C to stop)")
    run_server(web_app, sock)
