"""Classify photos with a trained checkpoint: files and folders in, top-k classes out.

Images go through exactly the preprocessing recorded in the checkpoint's card (the same
``build_eval_transform`` and ``load_image`` that evaluation uses), so ``predict`` over a test
folder agrees with ``evaluate`` image for image. A file that cannot be read is reported with
the reason and skipped; one bad photo never stops a batch of thousands, nor the other photos
of its batch: a file that is missing, vanished, unreadable, not a regular file (a named pipe
is never opened: it would wait forever), undecodable, or refused by ``data.memory_refusal``
(too many pixels, too elongated, or over the memory budget once resized) is skipped alone.

``Predictor`` is also what the Python API's ``load`` hands a notebook: it takes files or PIL
images (``predict``), runs on a chosen ``device`` (the command line's is the CPU), and answers
the top-k classes with their probabilities, the same numbers ``inat-finetune predict`` prints.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image, ImageOps
from torch import nn

from inat_finetune.data.datamodule import build_eval_transform
from inat_finetune.data.folders import SkippedFile
from inat_finetune.data.images import IMAGE_EXTENSIONS, ImageRefused, load_image, not_regular_reason
from inat_finetune.data.tta import tta_logits
from inat_finetune.errors import UserError, one_line
from inat_finetune.inference.evaluation import find_checkpoint, load_checkpoint
from inat_finetune.models.backbones import Preprocessing
from inat_finetune.runfiles import write_json_atomic, write_text_atomic
from inat_finetune.runtime.hardware import resolve_precision


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class name, probability), most likely first


@dataclass
class PredictionReport:
    checkpoint: str
    class_names: list[str]
    top_k: int
    tta: bool
    predictions: list[Prediction] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "class_names": self.class_names,
            "top_k": self.top_k,
            "tta": self.tta,
            "predictions": [
                {
                    "path": p.path,
                    "top": [{"class": c, "probability": prob} for c, prob in p.top],
                }
                for p in self.predictions
            ],
            "skipped": [asdict(s) for s in self.skipped],
        }


class Predictor:
    """A loaded checkpoint plus its preprocessing; shared by ``predict``, ``serve`` and the API."""

    def __init__(
        self,
        model: nn.Module,
        card: dict[str, Any],
        checkpoint: str = "",
        precision: str = "auto",
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        # Channels-last runs depthwise convolutions (MobileNet, EfficientNet) several times
        # faster on CPU, as training does; results agree with NCHW to float rounding.
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.card = card
        self.checkpoint = checkpoint
        self.class_names: list[str] = list(card["class_names"])
        self.preprocessing = Preprocessing.from_dict(card["preprocessing"])
        self.transform = build_eval_transform(self.preprocessing)
        # The same arithmetic as training's test phase and `evaluate` (bf16 autocast where the
        # device computes it natively), so all three agree image for image.
        self.autocast_dtype = _autocast_dtype(resolve_precision(precision, self.device.type))

    @classmethod
    def from_checkpoint(
        cls, run_or_ckpt: str | Path, device: str | torch.device = "cpu"
    ) -> Predictor:
        ckpt = find_checkpoint(run_or_ckpt)
        model, card = load_checkpoint(ckpt)
        return cls(model, card, str(ckpt), device=device)

    @property
    def bf16(self) -> bool:
        return self.autocast_dtype == torch.bfloat16

    @bf16.setter
    def bf16(self, on: bool) -> None:
        self.autocast_dtype = torch.bfloat16 if on else None

    def load(self, source: str | Path | IO[bytes] | Image.Image) -> torch.Tensor:
        """Decode one image and turn it into the network's input tensor (C, H, W)."""
        if isinstance(source, Image.Image):
            return self.transform(pil_as_rgb(source))
        # The same reduced-size JPEG decoding as training and evaluation, so results agree.
        image = load_image(source, draft_size=self.preprocessing.resize_size)
        return self.transform(image)

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """Logits for a preprocessed batch; with ``tta`` averaged with the mirrored batch."""

        def forward(images: torch.Tensor) -> torch.Tensor:
            return self.model(images.contiguous(memory_format=torch.channels_last))

        # The same test-time augmentation as evaluate (data/tta.py).
        dtype = self.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=bool(dtype)):
            return tta_logits(forward, batch.to(self.device), "flip" if tta else "none")

    def top(self, logits: torch.Tensor, top_k: int) -> list[list[tuple[str, float]]]:
        probs = logits.softmax(dim=1)
        values, indices = probs.topk(min(top_k, len(self.class_names)), dim=1)
        return [
            [(self.class_names[i], float(v)) for v, i in zip(vs, idx, strict=True)]
            for vs, idx in zip(values.tolist(), indices.tolist(), strict=True)
        ]

    def predict(
        self,
        images: str | Path | Image.Image | Sequence[str | Path | Image.Image],
        top_k: int = 1,
        batch_size: int = 32,
        tta: bool = False,
    ) -> list[list[tuple[str, float]]]:
        """Per image, its ``top_k`` (class name, probability) pairs, most likely first.

        Paths and PIL images may be mixed; a folder is not expanded here (``predict_paths`` does
        that, and skips unreadable files instead of raising). A JPEG given by path is decoded at
        reduced scale as in training; the same JPEG already opened as a PIL image was decoded in
        full, so its probabilities can differ in the third decimal.
        """
        if top_k < 1:
            raise UserError(f"top_k={top_k}: ask for at least one class per image (top_k=1)")
        items = [images] if isinstance(images, str | Path | Image.Image) else list(images)
        answers: list[list[tuple[str, float]]] = []
        for start in range(0, len(items), max(1, batch_size)):
            batch = torch.stack([self.load(item) for item in items[start : start + batch_size]])
            answers += self.top(self.logits(batch, tta), top_k)
        return answers


def _autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast type a resolved precision asks for; None runs in float32."""
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


def pil_as_rgb(image: Image.Image) -> Image.Image:
    """A PIL image as 8-bit RGB the way ``load_image`` treats a file: EXIF rotation applied,
    transparency laid on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def collect_images(paths: Iterable[str | Path]) -> tuple[list[Path], list[SkippedFile]]:
    """Expand folders recursively; files named explicitly are tried whatever their extension.

    Only regular files (or links to them) are collected; pipes, devices and sockets are skipped
    with their kind, without being opened.
    """
    found: list[Path] = []
    skipped: list[SkippedFile] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            walked, left_out = _walk_folder(path)
            found += walked
            skipped += left_out
            continue
        reason = _not_a_file(path)
        if reason is None:
            found.append(path)
        else:
            skipped.append(SkippedFile(str(path), reason))
    return found, skipped


def _walk_folder(folder: Path) -> tuple[list[Path], list[SkippedFile]]:
    found: list[Path] = []
    skipped: list[SkippedFile] = []
    # followlinks=False: a symlink loop cannot trap the walk.
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            file = Path(dirpath) / name
            reason = _not_a_file(file)
            if reason is None and file.suffix.lower() not in IMAGE_EXTENSIONS:
                reason = f"not an image file ({file.suffix or 'no extension'})"
            if reason is None:
                found.append(file)
            else:
                skipped.append(SkippedFile(str(file), reason))
    return found, skipped


def _not_a_file(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file (missing, a pipe, a device), or None."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "no such file or directory"
    except OSError as exc:
        return f"not readable ({exc.strerror or exc})"
    return not_regular_reason(mode)


def _try_load(predictor: Predictor, path: Path) -> torch.Tensor | str:
    """The network's input for ``path``, or why it is skipped; never raises for one bad file."""
    try:
        return predictor.load(path)
    except ImageRefused as exc:
        return exc.reason
    except Image.DecompressionBombError:
        return f"over the pixel limit ({Image.MAX_IMAGE_PIXELS} pixels)"
    except FileNotFoundError:
        return "vanished (no such file when it was read)"
    except PermissionError:
        return "not readable (permission denied)"
    except (OSError, SyntaxError, ValueError) as exc:
        try:
            if path.stat().st_size == 0:
                return "empty file"
        except OSError:
            pass  # a dangling link: the decode error below says enough
        return f"does not decode ({type(exc).__name__}: {exc})"
    except (RuntimeError, MemoryError) as exc:  # torch's failed allocations are RuntimeErrors
        return f"could not be processed ({type(exc).__name__}: {one_line(str(exc))})"


def _chunks(items: Sequence[Path], size: int) -> Iterable[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_paths(
    ckpt: str | Path | Predictor,
    paths: Iterable[str | Path],
    top_k: int = 5,
    batch_size: int = 32,
    tta: bool = False,
    progress: bool = True,
) -> PredictionReport:
    """Top-k classes with probabilities for every image in ``paths`` (files and folders)."""
    predictor = ckpt if isinstance(ckpt, Predictor) else Predictor.from_checkpoint(ckpt)
    files, skipped = collect_images(paths)
    report = PredictionReport(
        predictor.checkpoint, predictor.class_names, top_k, tta, skipped=skipped
    )
    bar = None
    if progress:
        from rich.console import Console
        from rich.progress import Progress

        bar = Progress(console=Console(stderr=True), transient=True)
        task = bar.add_task("Predicting", total=len(files))
        bar.start()
    try:
        # Decoding dominates on CPU; PIL releases the GIL, so threads decode in parallel.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for chunk in _chunks(files, max(1, batch_size)):
                loaded = list(pool.map(lambda p: _try_load(predictor, p), chunk))
                good = [(p, t) for p, t in zip(chunk, loaded, strict=True) if torch.is_tensor(t)]
                report.skipped += [
                    SkippedFile(str(p), t)
                    for p, t in zip(chunk, loaded, strict=True)
                    if isinstance(t, str)
                ]
                if good:
                    logits = predictor.logits(torch.stack([t for _, t in good]), tta)
                    for (path, _), top in zip(good, predictor.top(logits, top_k), strict=True):
                        report.predictions.append(Prediction(str(path), top))
                if bar is not None:
                    bar.advance(task, len(chunk))
    finally:
        if bar is not None:
            bar.stop()
    return report


def write_json(report: PredictionReport, path: str | Path) -> Path:
    return write_json_atomic(path, report.to_dict())


def write_csv(report: PredictionReport, path: str | Path) -> Path:
    """One row per file: path, error (skipped files only), then class_i/prob_i for i = 1..k."""
    k = min(report.top_k, len(report.class_names))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    ranks = [col for i in range(1, k + 1) for col in (f"class_{i}", f"prob_{i}")]
    writer.writerow(["path", "error", *ranks])
    for p in report.predictions:
        writer.writerow([p.path, "", *(v for c, prob in p.top for v in (c, f"{prob:.6f}"))])
    for s in report.skipped:
        writer.writerow([s.path, s.reason, *([""] * len(ranks))])
    return write_text_atomic(path, buffer.getvalue())
