"""The commands about a trained model: evaluate, predict, export, serve, report, and models.

A UserError from anywhere below is reported by the command group (app.py): one line, exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from inat_finetune.cli.app import console, out
from inat_finetune.cli.options import field_option
from inat_finetune.errors import UserError
from inat_finetune.runfiles import check_output_file
from inat_finetune.runtime.extras import require_extra

RunOrCheckpoint = Annotated[
    Path,
    typer.Argument(
        help="a run directory, a .ckpt file, or a folder from export --format safetensors"
    ),
]


DataOpt = field_option("data")


# The same --tta on train, evaluate, predict and serve: the TrainConfig field's option, declared
# once (its help and choices live in training/config.py); not given means none here.
TtaOpt = field_option("tta")


DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        help="auto, cpu, cuda, cuda:N or mps; auto: the GPU if there is one, else the CPU "
        "(bf16/fp16 where the device computes it natively)",
    ),
]


def renamed(old: str, new: str) -> Any:
    """A hidden option under an old spelling that only says what replaced it."""

    def refuse(value: Any) -> Any:
        if value not in (None, False):
            raise UserError(f"{old} is gone; use {new}")
        return value

    return typer.Option(old, hidden=True, callback=refuse)


def evaluate(
    run_or_ckpt: RunOrCheckpoint,
    data: DataOpt = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    num_workers: Annotated[int | None, typer.Option(min=0)] = None,
    device: DeviceOpt = "auto",
    precision: Annotated[str, typer.Option()] = "auto",
    save: Annotated[
        Path | None, typer.Option("--save", help="write the result as JSON here")
    ] = None,
    tta: TtaOpt = None,
    multi_crop: Annotated[bool, renamed("--multi-crop", "--tta multicrop")] = False,
    accelerator: Annotated[str | None, renamed("--accelerator", "--device")] = None,
) -> None:
    """Re-score a saved model on a test set (default: the run's own test split)."""
    from inat_finetune.data.tta import tta_mode
    from inat_finetune.inference.evaluation import evaluate as run_evaluation
    from inat_finetune.inference.evaluation import save_evaluation

    mode = tta_mode(tta)
    check_output_file(save, "--save", "evaluation.json")
    result = run_evaluation(run_or_ckpt, data, batch_size, num_workers, device, precision, tta=mode)
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


def _print_predictions(report: Any, top_k: int, where: Console) -> None:
    table = Table(title=f"Predictions ({len(report.predictions)} images)")
    table.add_column("path", overflow="fold")
    table.add_column("top class")
    table.add_column("probability", justify="right")
    if top_k > 1:
        table.add_column("next")
    for p in report.predictions:
        row = [p.path, p.top[0].label, f"{100 * p.top[0].score:.1f}%"]
        if top_k > 1:
            row.append(", ".join(f"{t.label} {100 * t.score:.1f}%" for t in p.top[1:]))
        table.add_row(*row)
    where.print(table)
    if report.skipped:
        skipped = Table(title=f"Skipped ({len(report.skipped)} files)")
        skipped.add_column("path", overflow="fold")
        skipped.add_column("reason")
        for s in report.skipped:
            skipped.add_row(s.path, s.reason)
        where.print(skipped)


def _prediction_targets(json_out: Path | None, csv_out: Path | None) -> bool:
    """Check --json/--csv (``-``: standard output, for one of them); whether one is stdout."""
    to_stdout = [name for name, t in (("--json", json_out), ("--csv", csv_out)) if str(t) == "-"]
    if len(to_stdout) > 1:
        raise UserError("--json - and --csv -: only one can go to standard output; name a file")
    if str(json_out) != "-":
        check_output_file(json_out, "--json", "predictions.json")
    if str(csv_out) != "-":
        check_output_file(csv_out, "--csv", "predictions.csv")
    return bool(to_stdout)


def predict(
    run_or_ckpt: RunOrCheckpoint,
    paths: Annotated[
        list[Path], typer.Argument(help="image files and folders (searched recursively)")
    ],
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="classes listed per image")] = 5,
    json_out: Annotated[
        Path | None,
        typer.Option(
            "--json",
            help="also write the predictions as JSON here: a list of {path, predictions: "
            "[{label, score}, ...]}; - for standard output (the table then goes to stderr)",
        ),
    ] = None,
    csv_out: Annotated[
        Path | None,
        typer.Option(
            "--csv",
            help="also write them as CSV here: path,label_1,score_1,...,error (- for stdout)",
        ),
    ] = None,
    tta: TtaOpt = None,
    batch_size: Annotated[int, typer.Option(min=1, help="images per forward pass")] = 32,
    device: DeviceOpt = "auto",
    num_workers: Annotated[
        int | None,
        typer.Option(
            min=0, help=escape("processes decoding images [default: one per core, up to 8]")
        ),
    ] = None,
) -> None:
    """Classify photos: top-k classes with probabilities for every image found."""
    from inat_finetune.inference.predict import predict_paths, write_csv, write_json

    # With JSON or CSV on stdout, everything for people goes to stderr so stdout parses.
    human = console if _prediction_targets(json_out, csv_out) else out
    report = predict_paths(
        run_or_ckpt,
        paths,
        top_k=top_k,
        batch_size=batch_size,
        tta=tta,
        device=device,
        num_workers=num_workers,
    )
    _print_predictions(report, top_k, human)
    for target, writer in ((json_out, write_json), (csv_out, write_csv)):
        if target is not None:
            written = writer(report, target)
            if written is not None:
                human.print(f"wrote {written}")


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
    device: DeviceOpt = "auto",
) -> None:
    """Export for other runtimes (dynamic batch), with the preprocessing JSON beside the model.

    The export is checked against PyTorch on --device before anything is written."""
    from inat_finetune.inference.export import check_export_output, export

    check_export_output(output, format)
    result = export(run_or_ckpt, format=format, output=output, device=device)
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
    device: DeviceOpt = "auto",
    tta: TtaOpt = None,
) -> None:
    """A web page to try the model on a photo (upload or drop), and a JSON API at /api/predict."""
    require_extra("serve", "serve")
    from inat_finetune.data.tta import tta_mode
    from inat_finetune.inference.predict import Predictor
    from inat_finetune.inference.serve import bind, create_app, is_loopback, run_server

    mode = tta_mode(tta)

    # Bound before the checkpoint loads and before "serving on" is printed: an invalid or
    # busy port is one line at once.
    sock = bind(host, port)
    try:
        predictor = Predictor.from_checkpoint(run_or_ckpt, device=device)
        web_app = create_app(predictor, max_upload_mb, max_megapixels, tta=mode)
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
