"""The linear probe on stored features: an L2 penalty chosen by grouped k-fold CV, one nn.Linear.

Contract. ``fit_probe(features, labels, seed, flipped=None)`` standardises the features (mean
and standard deviation of the rows it fits), fits a multinomial logistic regression by L-BFGS
with strong-Wolfe line search, loss = mean cross-entropy + ``weight_decay`` * ||W||^2 (the bias
is not penalised), with ``weight_decay`` chosen on ``GRID`` (1e-6 to 10, half-decades) by
stratified k-fold cross-validation on the rows given (on a stratified sample of ``CV_IMAGES``
of them when there are more, see there), and refits on all of them with the chosen penalty. The standardisation is then folded into the head (W' = W / sd,
b' = b - (mu / sd) W), so the result is the weight and bias of an ordinary ``nn.Linear`` on the
raw features: checkpoints, predict, export and serve need nothing new.

Flip views. ``flipped`` holds the features of each image's mirror image (row i mirrors row i).
Three ways to use them are scored by the same CV and the best is taken (ties: the simpler):
``plain`` (no flips), ``flip_tta`` (plain rows train; an image's score averages the logits of
it and its mirror, as ``--tta flip`` does) and ``flip_train_tta`` (mirrors are also training
rows). An image and its mirror are always in the same fold (``groups``): split across folds,
the mirror of a held-out photo would be in training and CV would choose too small a penalty.

Why hand-written, not scikit-learn: sklearn is not a dependency, and what is needed here is
~100 lines of torch on the tensors the feature cache already holds: ``LogisticRegressionCV``
has no grouped folds of its own (it takes a splitter) and no flip-TTA scoring, and fits each
fold and penalty in turn, where the folds here are fitted as one L-BFGS problem with
warm starts along the grid (largest penalty first). Not measured against sklearn (which is in
the fastai venv as a fastai dependency): on the loaded 2-core machine the whole search for
hymenoptera (195 images and their mirrors, 1280 features, 15 penalties, 5 folds, 3 flip uses)
takes seconds after the features, which is what the recipe needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

# Half-decades from 1e-6 to 10: a grid of 1e-4..1e-1 chose its top on hymenoptera, hence the width.
GRID: tuple[float, ...] = tuple(10.0 ** (e / 2) for e in range(-12, 3))

FOLDS = 5

MAX_ITER = 100  # L-BFGS iterations per fit; warm starts along the grid need far fewer

SD_FLOOR = 1e-6  # a feature constant over the fitted rows is scaled by this, and gets W = 0

FLIP_MODES = ("plain", "flip_tta", "flip_train_tta")  # in order of preference on a tie

# The weight decay is chosen on at most this many images (a stratified sample drawn from the
# seed): the grid's 5-fold fits grow with the rows, and on 4,000 images three grid points took a
# minute on two cores, so the whole search on nature_12K's 8,000 training images would take half
# an hour for a choice that a thousand images make as well. The refit on every image then uses
# the chosen penalty scaled by sample / all images: the same penalty against the summed loss.
CV_IMAGES = 1000

SMALL_PROBLEM = 4_000_000  # rows x features under which a fit runs on one thread (one_thread)


@dataclass
class ProbeFit:
    """The fitted head on raw features (``weight`` C x D, ``bias`` C) and how it was chosen."""

    weight: torch.Tensor
    bias: torch.Tensor
    weight_decay: float
    mode: str  # one of FLIP_MODES
    cv_acc: float
    folds: int
    cv: dict[str, dict[float, float]] = field(default_factory=dict)  # mode -> wd -> accuracy
    cv_images: int = 0  # images the choice was made on (CV_IMAGES at most)

    @property
    def tta(self) -> bool:
        return self.mode != "plain"

    @property
    def flip_train(self) -> bool:
        return self.mode == "flip_train_tta"

    def logits(self, features: torch.Tensor, flipped: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of raw features; with ``flipped`` and flip TTA chosen, the mean of both views."""
        plain = features.float() @ self.weight.T + self.bias
        if not self.tta or flipped is None:
            return plain
        return (plain + flipped.float() @ self.weight.T + self.bias) / 2

    def summary(self) -> dict[str, object]:
        """results.json's ``linear_probe``: the choice and every grid point's CV accuracy."""
        return {
            "weight_decay": self.weight_decay,
            "flips": self.mode,
            "cv_acc": self.cv_acc,
            "folds": self.folds,
            "cv_images": self.cv_images,
            "cv_acc_by_weight_decay": {
                mode: {f"{wd:.0e}": acc for wd, acc in scores.items()}
                for mode, scores in self.cv.items()
            },
        }


def standardiser(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation per feature (floored at ``SD_FLOOR``)."""
    return features.mean(0), features.std(0, unbiased=False).clamp_min(SD_FLOOR)


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    row_weights: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K problems at once: ``x`` K x N x D, ``row_weights`` K x N (each row sums to 1, zero on
    rows a problem leaves out). Returns (W: K x D x C, b: K x C) minimising, for each k, the
    weighted cross-entropy + weight_decay * ||W_k||^2, by one L-BFGS on their sum (the problems
    share no parameter, so the sum's minimum is every problem's: one optimiser for the K folds
    instead of K keeps Python's overhead, most of the cost at these sizes, K times lower)."""
    if start is None:
        start = (
            torch.zeros(x.shape[0], x.shape[2], num_classes),
            torch.zeros(x.shape[0], num_classes),
        )
    w = start[0].clone().requires_grad_(True)
    b = start[1].clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [w, b],
        lr=1,
        max_iter=MAX_ITER,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-5,
        tolerance_change=1e-7,
    )
    targets = y.expand(x.shape[0], -1)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = torch.baddbmm(b[:, None, :], x, w)
        losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        loss = (losses * row_weights).sum() + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with (
        torch.enable_grad(),
        one_thread() if x.numel() < SMALL_PROBLEM else contextlib.nullcontext(),
    ):
        optimizer.step(closure)
    return w.detach(), b.detach()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread: the fits are thousands of sub-millisecond operations, where
    threads cost more in waking up than they save (2 threads on a loaded 2-core machine: 13 s
    for the grid of an 8-feature problem, against 0.6 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fold_standardisation(
    w: torch.Tensor, b: torch.Tensor, mean: torch.Tensor, sd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """An nn.Linear (weight C x D, bias C) on raw features equal to ``((x - mean) / sd) @ w + b``."""
    scaled = w / sd[:, None]
    return scaled.T.contiguous(), b - mean @ scaled


def stratified_group_folds(
    labels: torch.Tensor, groups: torch.Tensor, k: int, seed: int
) -> torch.Tensor:
    """A fold number per row: whole groups dealt to ``k`` folds class by class (stratified),
    in an order drawn from ``seed``; a group's class is its first row's label."""
    first: dict[int, int] = {}
    for row, group in enumerate(groups.tolist()):
        first.setdefault(group, row)
    by_class: dict[int, list[int]] = {}
    for group, row in sorted(first.items()):
        by_class.setdefault(int(labels[row]), []).append(group)
    generator = torch.Generator().manual_seed(seed)
    fold_of: dict[int, int] = {}
    dealt = 0
    for label in sorted(by_class):
        members = by_class[label]
        order = torch.randperm(len(members), generator=generator).tolist()
        for position, index in enumerate(order):
            fold_of[members[index]] = (dealt + position) % k
        dealt += len(members)  # the next class starts where this one stopped: even folds
    return torch.tensor([fold_of[g] for g in groups.tolist()])


def folds_for(
    labels: torch.Tensor, groups: torch.Tensor, seed: int, k: int = FOLDS
) -> torch.Tensor:
    """``stratified_group_folds`` with k lowered to the rarest class's images (at least 2)."""
    per_class = torch.bincount(labels[_first_rows(groups)])
    return stratified_group_folds(labels, groups, max(2, min(k, int(per_class.min()))), seed)


def _first_rows(groups: torch.Tensor) -> torch.Tensor:
    """The first row of each group (its plain view), in group order of appearance."""
    seen: dict[int, int] = {}
    for row, group in enumerate(groups.tolist()):
        seen.setdefault(group, row)
    return torch.tensor(list(seen.values()))


def held_out_correct(
    logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, tta: bool
) -> int:
    """Images right among held-out rows: each image's plain view, or with ``tta`` the mean
    logits of all its views."""
    if not tta:
        rows = _first_rows(groups)
        return int((logits[rows].argmax(1) == labels[rows]).sum())
    unique, inverse = torch.unique(groups, return_inverse=True)
    summed = torch.zeros(len(unique), logits.shape[1]).index_add_(0, inverse, logits)
    truth = torch.zeros(len(unique), dtype=torch.long).scatter_(0, inverse, labels)
    return int((summed.argmax(1) == truth).sum())


def cv_scores(
    features: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    folds: torch.Tensor,
    grid: tuple[float, ...] = GRID,
    tta: bool = False,
    train_views: str = "all",
) -> dict[float, float]:
    """CV accuracy per image for each weight decay of ``grid`` (see ``cv_table``)."""
    return cv_table(features, labels, groups, folds, grid, (tta,), train_views)[tta]


def cv_table(
    features: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    folds: torch.Tensor,
    grid: tuple[float, ...] = GRID,
    scorings: tuple[bool, ...] = (False,),
    train_views: str = "all",
) -> dict[bool, dict[float, float]]:
    """CV accuracy per image for each weight decay of ``grid``, for each scoring of
    ``scorings`` (False: the plain view; True: flip TTA, the mean logits of all views).

    Rows of one ``groups`` value are views of one image (first row: the plain view) and must
    share a fold. ``train_views`` "all" trains on every view of the other folds, "first" on
    their plain views only. Each fold is standardised by its own training rows."""
    check_groups_in_one_fold(groups, folds)
    features, labels = features.float(), labels.long()
    first = torch.zeros(len(groups), dtype=torch.bool)
    first[_first_rows(groups)] = True
    names = torch.unique(folds).tolist()
    held = torch.stack([folds == fold for fold in names])  # K x N
    train = ~held & (first if train_views == "first" else torch.ones_like(first))
    weights = train.float() / train.sum(1, keepdim=True)
    x = torch.stack([standardised(features, features[rows]) for rows in train])  # K x N x D
    correct = {scoring: dict.fromkeys(grid, 0) for scoring in scorings}
    fitted = None
    for wd in sorted(grid, reverse=True):  # warm start from the next larger penalty
        fitted = fit_logistic(x, labels, weights, int(labels.max()) + 1, wd, fitted)
        logits = torch.baddbmm(fitted[1][:, None, :], x, fitted[0])
        for k, rows in enumerate(held):
            for scoring in scorings:
                correct[scoring][wd] += held_out_correct(
                    logits[k][rows], labels[rows], groups[rows], scoring
                )
    images = len(torch.unique(groups))
    return {scoring: {wd: correct[scoring][wd] / images for wd in grid} for scoring in scorings}


def standardised(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    mean, sd = standardiser(reference)
    return (features - mean) / sd


def check_groups_in_one_fold(groups: torch.Tensor, folds: torch.Tensor) -> None:
    """Views of one image in two folds would leak the held-out image into training."""
    pairs = torch.unique(torch.stack([groups, folds]), dim=1)
    if len(torch.unique(pairs[0])) != pairs.shape[1]:
        raise ValueError(
            "an image's views are in different folds; give every view its image's fold"
        )


def best_of(scores: dict[float, float]) -> tuple[float, float]:
    """(accuracy, weight decay) of the best grid point; on a tie the larger penalty."""
    wd = max(scores, key=lambda w: (scores[w], w))
    return scores[wd], wd


def views(
    features: torch.Tensor, labels: torch.Tensor, flipped: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows, labels and image ids: the plain views, then (if given) the mirrors."""
    groups = torch.arange(len(labels))
    if flipped is None:
        return features, labels, groups
    return torch.cat([features, flipped]), torch.cat([labels, labels]), torch.cat([groups, groups])


def cv_sample(labels: torch.Tensor, seed: int, limit: int | None = None) -> torch.Tensor:
    """Indices of at most ``limit`` (default ``CV_IMAGES``) images, each class in proportion (at
    least one each), drawn from ``seed``; every image when there are no more than ``limit``."""
    limit = CV_IMAGES if limit is None else limit
    if len(labels) <= limit:
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in torch.unique(labels).tolist():
        members = (labels == label).nonzero().flatten()
        take = max(1, round(limit * len(members) / len(labels)))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.cat(chosen).sort().values


def fit_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
    flipped: torch.Tensor | None = None,
    grid: tuple[float, ...] = GRID,
    k: int = FOLDS,
) -> ProbeFit:
    """Choose the weight decay (and flip use) by grouped CV on at most ``CV_IMAGES`` images,
    refit on every row, fold."""
    features, labels = features.float(), labels.long()
    flipped = None if flipped is None else flipped.float()
    sample = cv_sample(labels, seed)
    mode, score, wd, folds, cv = choose_by_cv(
        features[sample],
        labels[sample],
        seed,
        None if flipped is None else flipped[sample],
        grid,
        k,
    )
    wd *= len(sample) / len(labels)  # the same penalty against the summed loss
    rows, row_labels, _ = views(features, labels, flipped)
    fit_rows = rows if mode == "flip_train_tta" else features
    fit_labels = row_labels if mode == "flip_train_tta" else labels
    mean, sd = standardiser(fit_rows)
    everything = torch.full((1, len(fit_labels)), 1 / len(fit_labels))
    w, b = fit_logistic(
        ((fit_rows - mean) / sd)[None], fit_labels, everything, int(labels.max()) + 1, wd
    )
    weight, bias = fold_standardisation(w[0], b[0], mean, sd)
    return ProbeFit(weight, bias, wd, mode, score, folds, cv, cv_images=len(sample))


def choose_by_cv(
    features: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
    flipped: torch.Tensor | None,
    grid: tuple[float, ...],
    k: int,
) -> tuple[str, float, float, int, dict[str, dict[float, float]]]:
    """(flip mode, CV accuracy, weight decay, folds, every mode's CV table) by grouped CV."""
    rows, row_labels, groups = views(features, labels, flipped)
    folds = folds_for(row_labels, groups, seed, k)
    # plain and flip_tta train on the same rows (the plain views): one set of fits, two scores.
    scorings = (False, True) if flipped is not None else (False,)
    table = cv_table(rows, row_labels, groups, folds, grid, scorings, train_views="first")
    cv = {"plain": table[False]}
    if flipped is not None:
        cv["flip_tta"] = table[True]
        cv["flip_train_tta"] = cv_scores(rows, row_labels, groups, folds, grid, True, "all")
    modes = [mode for mode in FLIP_MODES if mode in cv]
    # The best accuracy; on a tie the simpler mode (within a mode, the larger penalty).
    mode = max(modes, key=lambda m: (best_of(cv[m])[0], -modes.index(m)))
    score, wd = best_of(cv[mode])
    return mode, score, wd, int(folds.max()) + 1, cv
