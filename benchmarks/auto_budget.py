"""Does ``--recipe auto`` choose within ``--budget`` on data the size of nature_12K? Timing only.

    PYTHONPATH=src python benchmarks/auto_budget.py --budget 2m            # ~10,000 images
    PYTHONPATH=src python benchmarks/auto_budget.py --budget 2m --img-size 224   # train's default
    PYTHONPATH=src python benchmarks/auto_budget.py --images 3000 --budget 1m --img-size 64

Makes a folder the size of nature_12K's training set out of the flowers photos
(``../shared/datasets/flowers``) by hard links, so it costs no disk: ``train/<class>/`` holds
each class's photos repeated until ``--images`` in all, ``val/<class>/`` (the test set) a tenth
of each class's photos held out and never repeated into ``train/`` (the leak guard refuses a
test photo byte-identical to a training one, so photos with the same bytes count as one).
Repeated photos make the accuracy meaningless: this measures only how long the choice takes.

Then runs ``inat-finetune train`` (the API's ``train``: ``--recipe auto``, its default) with
``--budget`` and ``--epochs 1`` for the final run, and prints the phases: scanning and
splitting (before the budget), the choice's seconds against the budget (``results.json``'s
``auto.choice_seconds``: measuring the costs, then the candidates' rounds), the sample the
choice used, and the final run (after the budget). A time budget sizes the sample so that
round 0 fits, and stops a candidate's training between batches at its share; the probe's
feature passes cannot stop midway, so only a machine far slower than its first batches said
makes them overrun.
"""

from __future__ import annotations

import inat_finetune  # noqa: F401 - first: sets OpenMP's wait policy before torch loads

# isort: split
import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOWERS = ROOT.parent / "shared" / "datasets" / "flowers"


def distinct_photos(folder: Path) -> list[Path]:
    """The class folder's photos, one per distinct content."""
    seen: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in (".jpg", ".jpeg", ".png"):
            seen.setdefault(hashlib.blake2b(path.read_bytes()).hexdigest(), path)
    return sorted(seen.values())


def make_repeated(source: Path, dest: Path, images: int) -> Path:
    """``dest/train`` (repeats, ``images`` in all) and ``dest/val`` (held out), hard-linked."""
    classes = sorted(p for p in source.iterdir() if p.is_dir())
    per_class = images // len(classes)
    for folder in classes:
        photos = distinct_photos(folder)
        held = photos[: max(1, len(photos) // 10)]
        kept = photos[len(held) :]
        for path in held:
            target = dest / "val" / folder.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
        for i in range(per_class):
            path = kept[i % len(kept)]
            target = dest / "train" / folder.name / f"r{i // len(kept)}-{path.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=FLOWERS)
    parser.add_argument("--images", type=int, default=10_000, help="training images in all")
    parser.add_argument("--budget", default="2m", help="--budget of train: 2m, 8e")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--backbone", default="mobilenet_v2")
    args = parser.parse_args()

    from inat_finetune.api import train

    with tempfile.TemporaryDirectory() as tmp:  # never inside the shared photo folders
        if os.stat(tmp).st_dev != os.stat(args.source).st_dev:
            raise SystemExit(f"{tmp} is on another disk than {args.source}: no hard links")
        data = make_repeated(args.source, Path(tmp) / "data", args.images)
        started = time.perf_counter()
        run = train(
            data,
            backbone=args.backbone,
            budget=args.budget,
            img_size=args.img_size,
            epochs=1,
            output=str(Path(tmp) / "runs"),
            cache_dir=str(Path(tmp) / "cache"),
            progress=False,
            report=False,
        )
        wall = time.perf_counter() - started
        chosen = run.results["auto"]
        sample = chosen["sample"]
        print(f"images: {run.results['num_images']}")
        print(
            f"sample: {100 * sample['fraction']:.1f}% -> {sample['train_images']} train, "
            f"{sample['val_images']} val; costs {sample.get('costs')}; "
            f"measuring {sample.get('measured_s', 0):.0f} s"
        )
        for candidate in chosen["candidates"]:
            rounds = ", ".join(
                f"round {r['round']}: {r['epochs']} epochs x {r['folds']} fold(s) "
                f"val {100 * r['val_acc']:.1f}% {r['seconds']:.0f} s"
                + (f" interrupted {r['interrupted']}" if r.get("interrupted") else "")
                + (f" not run ({r['not_run']})" if r.get("not_run") else "")
                for r in candidate["rounds"]
            )
            print(f"  {candidate['name']}: {rounds}")
        final = chosen["refit"]["seconds"]
        print(
            f"budget {chosen['budget']}: choice took {chosen['choice_seconds']:.0f} s "
            f"({chosen['halving_stopped']}); winner {chosen['winner']}; "
            f"scan and split {wall - chosen['choice_seconds'] - final:.0f} s; "
            f"final run {final:.0f} s; wall time {wall:.0f} s"
        )


if __name__ == "__main__":
    main()
