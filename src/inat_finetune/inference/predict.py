"""Classify photos with a trained checkpoint: files and folders in, top-k classes out.

Images go through exactly the preprocessing recorded in the checkpoint's card (the same
``build_eval_transform`` and ``load_image`` that evaluation uses), so ``predict`` over a test
folder agrees with ``evaluate`` image for image. A file that cannot be read is reported with
the reason and skipped; one bad photo never stops a batch of thousands, nor the other photos
of its batch: a file that is missing, vanished, unreadable, not a regular file (a named pipe
is never opened: it would wait forever), undecodable, or refused by ``data.memory_refusal``
(too many pixels, too elongated, or over the memory budget once resized) is skipped alone.

Batched inference (``predict_paths``) decodes, resizes and crops in DataLoader worker
processes on the CPU and hands the batch over as uint8, as the training loaders do
(``data.datamodule``): the batch is copied to the device (pinned, for a GPU) and normalised
there (``ToNormalisedFloat``, the same values bit for bit as normalising each image on the CPU).

The outputs follow the convention Hugging Face pipelines and timm use: per image
``{"path", "predictions": [{"label", "score"}, ...]}``, most likely first. A skipped file is
an entry of the same list with ``"predictions": []`` and ``"error": <reason>`` (after the
predicted images); in CSV (``path,label_1,score_1,...,error``) a row with empty labels and
scores and the reason in ``error``.

``Predictor`` is also what the Python API's ``load`` hands a notebook: it takes files or PIL
images (``predict``), runs on a chosen ``device`` (``runtime.devices``: auto, cpu, cuda,
cuda:N, mps) with the arithmetic that device computes natively (bf16 or fp16 autocast where it
has it), and answers per image its top-k ``LabelScore(label, score)`` pairs, the same numbers
``inat-finetune predict`` prints.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch
from PIL import Image, ImageOps
from torch import nn
from torch.utils.data import DataLoader, Dataset

from inat_finetune.data.datamodule import ToNormalisedFloat, default_num_workers
from inat_finetune.data.folders import SkippedFile
from inat_finetune.data.images import IMAGE_EXTENSIONS, ImageRefused, load_image, not_regular_reason
from inat_finetune.data.tta import TTA_MODES, tta_eval_transform, tta_logits, tta_mode
from inat_finetune.errors import UserError, one_line
from inat_finetune.inference.evaluation import find_checkpoint, load_checkpoint
from inat_finetune.models.backbones import Preprocessing
from inat_finetune.runfiles import write_text_atomic
from inat_finetune.runtime.allocator import freed_memory_kept, keep_freed_memory
from inat_finetune.runtime.devices import resolve_device
from inat_finetune.runtime.hardware import resolve_precision

STDOUT = "-"  # --json - / --csv -: write to standard output instead of a file


class LabelScore(NamedTuple):
    """One class of an image's answer: its name and its probability (softmax of the logits)."""

    label: str
    score: float


@dataclass
class Prediction:
    path: str
    top: list[LabelScore]  # most likely first

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "predictions": [t._asdict() for t in self.top]}


@dataclass
class PredictionReport:
    checkpoint: str
    class_names: list[str]
    top_k: int
    tta: str
    predictions: list[Prediction] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)

    def to_list(self) -> list[dict[str, Any]]:
        """The JSON output: predicted images, then skipped files (empty predictions, error)."""
        return [p.to_dict() for p in self.predictions] + [
            {"path": s.path, "predictions": [], "error": s.reason} for s in self.skipped
        ]


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
        self.device = resolve_device(device, "device=")
        # Channels-last runs depthwise convolutions (MobileNet, EfficientNet) several times
        # faster on CPU, as training does; results agree with NCHW to float rounding.
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.card = card
        self.checkpoint = checkpoint
        self.class_names: list[str] = list(card["class_names"])
        self.preprocessing = Preprocessing.from_dict(card["preprocessing"])
        # uint8 out of the transforms (one per TTA mode: multicrop needs the whole resized
        # square); normalised where the batch is computed on, as the training loaders do.
        self.transforms = {
            mode: tta_eval_transform(self.preprocessing, mode, normalise=False)
            for mode in TTA_MODES
        }
        self.transform = self.transforms["none"]
        self.normalise = ToNormalisedFloat(self.preprocessing.mean, self.preprocessing.std)
        # The same arithmetic as training's test phase and `evaluate` (bf16 autocast where the
        # device computes it natively, fp16 on GPUs without bf16), so all three agree.
        self.autocast_dtype = _autocast_dtype(resolve_precision(precision, self.device.type))

    @classmethod
    def from_checkpoint(
        cls, run_or_ckpt: str | Path, device: str | torch.device = "cpu"
    ) -> Predictor:
        device = resolve_device(device)  # before loading: a missing GPU is refused at once
        ckpt = find_checkpoint(run_or_ckpt)
        model, card = load_checkpoint(ckpt)
        return cls(model, card, str(ckpt), device=device)

    @property
    def bf16(self) -> bool:
        return self.autocast_dtype == torch.bfloat16

    @bf16.setter
    def bf16(self, on: bool) -> None:
        self.autocast_dtype = torch.bfloat16 if on else None

    def load_uint8(
        self, source: str | Path | IO[bytes] | Image.Image, tta: str | bool = "none"
    ) -> torch.Tensor:
        """Decode one image into the network's input size, as uint8 (C, H, W)."""
        transform = self.transforms[tta_mode(tta)]
        if isinstance(source, Image.Image):
            return transform(pil_as_rgb(source))
        # The same reduced-size JPEG decoding as training and evaluation, so results agree.
        return transform(load_image(source, draft_size=self.preprocessing.resize_size))

    def load(
        self, source: str | Path | IO[bytes] | Image.Image, tta: str | bool = "none"
    ) -> torch.Tensor:
        """Decode one image and turn it into the network's normalised input (C, H, W)."""
        return self.normalise(self.load_uint8(source, tta))

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor, tta: str | bool = "none") -> torch.Tensor:
        """Logits for a batch (uint8 or normalised), averaged over the views of ``tta``."""
        mode = tta_mode(tta)

        def forward(images: torch.Tensor) -> torch.Tensor:
            return self.model(images.contiguous(memory_format=torch.channels_last))

        batch = batch.to(self.device, non_blocking=True)
        if batch.dtype == torch.uint8:
            batch = self.normalise(batch)  # on the device, after the quarter-size copy
        # The same test-time augmentation as evaluate (data/tta.py).
        dtype = self.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=bool(dtype)):
            return tta_logits(forward, batch, mode, crop_size=self.preprocessing.crop_size)

    def top(self, logits: torch.Tensor, top_k: int) -> list[list[LabelScore]]:
        probs = logits.float().softmax(dim=1)
        values, indices = probs.topk(min(top_k, len(self.class_names)), dim=1)
        return [
            [LabelScore(self.class_names[i], float(v)) for v, i in zip(vs, idx, strict=True)]
            for vs, idx in zip(values.tolist(), indices.tolist(), strict=True)
        ]

    def predict(
        self,
        images: str | Path | Image.Image | Sequence[str | Path | Image.Image],
        top_k: int = 1,
        batch_size: int = 32,
        tta: str | bool = "none",
    ) -> list[list[LabelScore]]:
        """Per image, its ``top_k`` ``LabelScore(label, score)`` pairs, most likely first.

        Paths and PIL images may be mixed; a folder is not expanded here (``predict_paths`` does
        that, and skips unreadable files instead of raising). A JPEG given by path is decoded at
        reduced scale as in training; the same JPEG already opened as a PIL image was decoded in
        full, so its probabilities can differ in the third decimal. ``tta``: none, flip or
        multicrop (True: flip).
        """
        if top_k < 1:
            raise UserError(f"top_k={top_k}: ask for at least one class per image (top_k=1)")
        items = [images] if isinstance(images, str | Path | Image.Image) else list(images)
        answers: list[list[LabelScore]] = []
        for start in range(0, len(items), max(1, batch_size)):
            chunk = items[start : start + batch_size]
            batch = torch.stack([self.load_uint8(item, tta) for item in chunk])
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


def _try_load(
    path: Path, transform: Callable[[Any], torch.Tensor], draft: int
) -> torch.Tensor | str:
    """The network's uint8 input for ``path``, or why it is skipped; never raises for one file."""
    try:
        return transform(load_image(path, draft_size=draft))
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


class ImageFiles(Dataset):
    """Image files as (path, uint8 tensor or the reason it is skipped).

    With ``threads`` > 1 a batch's images are decoded by that many threads at once (PIL
    releases the GIL): how the main process loads when there are no worker processes.
    """

    def __init__(
        self, files: Sequence[Path], transform: Any, draft_size: int, threads: int = 1
    ) -> None:
        self.files = list(files)
        self.transform = transform
        self.draft_size = draft_size
        self.threads = threads

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor | str]:
        path = self.files[index]
        return str(path), _try_load(path, self.transform, self.draft_size)

    def __getitems__(self, indices: list[int]) -> list[tuple[str, torch.Tensor | str]]:
        """A batch's items (the DataLoader asks for a batch at once when this exists)."""
        if self.threads <= 1 or len(indices) <= 1:
            return [self[i] for i in indices]
        with ThreadPoolExecutor(max_workers=min(self.threads, len(indices))) as pool:
            return list(pool.map(self.__getitem__, indices))


def collate_loaded(
    items: list[tuple[str, torch.Tensor | str]],
) -> tuple[torch.Tensor | None, list[str], list[SkippedFile]]:
    """A batch of the images that loaded (uint8, stacked), their paths, and the skipped files."""
    good = [(path, t) for path, t in items if isinstance(t, torch.Tensor)]
    skipped = [SkippedFile(path, t) for path, t in items if isinstance(t, str)]
    images = torch.stack([t for _, t in good]) if good else None
    return images, [path for path, _ in good], skipped


def loader_workers(
    num_workers: int | None, files: int, batch_size: int, device: torch.device
) -> int:
    """Worker processes for ``files`` images. For a GPU (or MPS): one per core (at most 8),
    never more than there are batches, so decoding overlaps the device's work. For the CPU,
    and for a single batch: none; the main process decodes each batch with threads between
    forward passes, as ``predict`` always did on the CPU, where the network needs every core.
    """
    if num_workers is not None:
        return num_workers
    batches = -(-files // batch_size)
    if device.type == "cpu" or batches <= 1:
        return 0
    return min(default_num_workers(), batches)


def predict_paths(
    ckpt: str | Path | Predictor,
    paths: Iterable[str | Path],
    top_k: int = 5,
    batch_size: int = 32,
    tta: str | bool = "none",
    progress: bool = True,
    device: str | torch.device = "cpu",
    num_workers: int | None = None,
) -> PredictionReport:
    """Top-k classes with probabilities for every image in ``paths`` (files and folders).

    ``device`` is used when ``ckpt`` is a path (a ``Predictor`` brings its own); ``tta``:
    none, flip or multicrop (True: flip).
    """
    mode = tta_mode(tta)
    if isinstance(ckpt, Predictor):
        predictor = ckpt
    else:
        predictor = Predictor.from_checkpoint(ckpt, device=device)
    files, skipped = collect_images(paths)
    report = PredictionReport(
        predictor.checkpoint, predictor.class_names, top_k, mode, skipped=skipped
    )
    batch_size = max(1, batch_size)
    workers = loader_workers(num_workers, len(files), batch_size, predictor.device)
    threads = 1 if workers else min(8, os.cpu_count() or 1)
    loader = DataLoader(
        ImageFiles(files, predictor.transforms[mode], predictor.preprocessing.resize_size, threads),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_loaded,
        pin_memory=predictor.device.type == "cuda",
        worker_init_fn=keep_freed_memory if workers else None,
    )
    # On the CPU, freed activations are reused instead of fresh pages (as training does).
    on_cpu = predictor.device.type == "cpu"
    with freed_memory_kept(on_cpu), _progress_bar(progress, len(files)) as advance:
        for images, good, left_out in loader:
            report.skipped += left_out
            if images is not None:
                tops = predictor.top(predictor.logits(images, mode), top_k)
                report.predictions += [
                    Prediction(path, top) for path, top in zip(good, tops, strict=True)
                ]
            advance(len(good) + len(left_out))
    return report


@contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Callable[[int], None]]:
    """A transient progress bar on stderr (or nothing); yields ``advance(n)``."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("Predicting", total=total)
        yield lambda n: bar.advance(task, n)


def _json_text(report: PredictionReport) -> str:
    import json

    return json.dumps(report.to_list(), indent=2) + "\n"


def _csv_text(report: PredictionReport) -> str:
    k = min(report.top_k, len(report.class_names))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    ranks = [col for i in range(1, k + 1) for col in (f"label_{i}", f"score_{i}")]
    writer.writerow(["path", *ranks, "error"])
    for p in report.predictions:
        writer.writerow([p.path, *(v for t in p.top for v in (t.label, f"{t.score:.6f}")), ""])
    for s in report.skipped:
        writer.writerow([s.path, *([""] * len(ranks)), s.reason])
    return buffer.getvalue()


def _write(text: str, path: str | Path) -> Path | None:
    """``text`` to ``path`` atomically, or to standard output for ``-`` (None then)."""
    if str(path) == STDOUT:
        sys.stdout.write(text)
        sys.stdout.flush()
        return None
    return write_text_atomic(path, text)


def write_json(report: PredictionReport, path: str | Path) -> Path | None:
    """A list of ``{"path", "predictions": [{"label", "score"}, ...]}``, skipped files last
    with ``"predictions": []`` and their ``"error"``; ``-`` writes to standard output."""
    return _write(_json_text(report), path)


def write_csv(report: PredictionReport, path: str | Path) -> Path | None:
    """One row per file: path, label_i/score_i for i = 1..k, then error (skipped files only,
    whose labels and scores are empty); ``-`` writes to standard output."""
    return _write(_csv_text(report), path)
