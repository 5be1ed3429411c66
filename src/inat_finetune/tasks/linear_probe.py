"""The linear probe on stored features: an L2 penalty chosen by grouped k-fold CV, one nn.Linear.

Contract. ``fit_probe(features, labels, seed, flipped=None)`` standardises the features (mean
and standard deviation of the rows it fits), fits a multinomial logistic regression by L-BFGS
with strong-Wolfe line search, loss = mean cross-entropy + ``weight_decay`` * ||W||^2 (the bias
is not penalised), with ``weight_decay`` chosen on ``GRID`` (1e-6 to 10, half-decades) by
stratified k-fold cross-validation on the rows given, and refits on all of them with the
chosen penalty. The standardisation is then folded into the head (W' = W / sd,
b' = b - (mu / sd) W), so the result is the weight and bias of an ordinary ``nn.Linear`` on the
raw features: checkpoints, predict, export and serve need nothing new.

Flip views. ``flipped`` holds the features of each image's mirror image (row i mirrors row i).
Three ways to use them are scored by the same CV and the best is taken (ties: the simpler):
``plain`` (no flips), ``flip_tta`` (plain rows train; an image's score averages the logits of
it and its mirror, as ``--tta flip`` does) and ``flip_train_tta`` (mirrors are also training
rows). An image and its mirror are always in the same fold (``groups``): split across folds,
the mirror of a held-out photo would be in training and CV would choose too small a penalty.

``probe_cv_score(features, labels, groups, folds)`` is the score one candidate gets on given
folds (``--recipe auto`` calls it): rows sharing a group are views of one image, the first of
them its plain view; it returns (CV accuracy per image, chosen weight decay).

Why hand-written, not scikit-learn: sklearn is not a dependency, and ~60 lines of torch do what
``LogisticRegressionCV`` would here (L-BFGS, multinomial, grouped folds) on the tensors the
feature cache already holds, at the same speed on these sizes (hundreds to thousands of rows of
1280 features: each fit is milliseconds to tens of milliseconds), and warm-start along the grid
(largest penalty first) keeps the whole search to seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

# Half-decades from 1e-6 to 10: the lead's grid (1e-4..1e-1) chose its top, hence the width.
GRID: tuple[float, ...] = tuple(10.0 ** (e / 2) for e in range(-12, 3))

FOLDS = 5

MAX_ITER = 100  # L-BFGS iterations per fit; warm starts along the grid need far fewer

SD_FLOOR = 1e-6  # a feature constant over the fitted rows is scaled by this, and gets W = 0

FLIP_MODES = ("plain", "flip_tta", "flip_train_tta")  # in order of preference on a tie


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
    num_classes: int,
    weight_decay: float,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W: D x C, b: C) minimising mean cross-entropy + weight_decay * ||W||^2 by L-BFGS."""
    if start is None:
        w0, b0 = torch.zeros(x.shape[1], num_classes), torch.zeros(num_classes)
    else:
        w0, b0 = start
    w = w0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [w, b], lr=1, max_iter=MAX_ITER, line_search_fn="strong_wolfe", tolerance_grad=1e-6
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach(), b.detach()


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
    """CV accuracy per image for each weight decay of ``grid``.

    Rows of one ``groups`` value are views of one image (first row: the plain view) and must
    share a fold. ``train_views`` "all" trains on every view of the other folds, "first" on
    their plain views only; held-out images are scored by ``held_out_correct``."""
    check_groups_in_one_fold(groups, folds)
    features, labels = features.float(), labels.long()
    num_classes = int(labels.max()) + 1
    first = torch.zeros(len(groups), dtype=torch.bool)
    first[_first_rows(groups)] = True
    correct = dict.fromkeys(grid, 0)
    for fold in torch.unique(folds).tolist():
        held = folds == fold
        train = ~held & (first if train_views == "first" else torch.ones_like(first))
        mean, sd = standardiser(features[train])
        x_train, x_held = (features[train] - mean) / sd, (features[held] - mean) / sd
        start = None
        for wd in sorted(grid, reverse=True):  # warm start from the next larger penalty
            start = fit_logistic(x_train, labels[train], num_classes, wd, start)
            logits = x_held @ start[0] + start[1]
            correct[wd] += held_out_correct(logits, labels[held], groups[held], tta)
    images = len(torch.unique(groups))
    return {wd: correct[wd] / images for wd in grid}


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


def probe_cv_score(
    features: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    folds: torch.Tensor,
    grid: tuple[float, ...] = GRID,
    tta: bool = False,
) -> tuple[float, float]:
    """A linear probe's CV accuracy on given folds and the weight decay that reached it."""
    return best_of(cv_scores(features, labels, groups, folds, grid, tta))


def views(
    features: torch.Tensor, labels: torch.Tensor, flipped: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows, labels and image ids: the plain views, then (if given) the mirrors."""
    groups = torch.arange(len(labels))
    if flipped is None:
        return features, labels, groups
    return torch.cat([features, flipped]), torch.cat([labels, labels]), torch.cat([groups, groups])


def fit_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
    flipped: torch.Tensor | None = None,
    grid: tuple[float, ...] = GRID,
    k: int = FOLDS,
) -> ProbeFit:
    """Choose the weight decay (and flip use) by grouped CV, refit on every row, fold."""
    features, labels = features.float(), labels.long()
    rows, row_labels, groups = views(features, labels, flipped)
    folds = folds_for(row_labels, groups, seed, k)
    modes = FLIP_MODES if flipped is not None else FLIP_MODES[:1]
    cv = {
        mode: cv_scores(
            rows if mode != "plain" else features,
            row_labels if mode != "plain" else labels,
            groups if mode != "plain" else groups[: len(labels)],
            folds if mode != "plain" else folds[: len(labels)],
            grid,
            tta=mode != "plain",
            train_views="all" if mode == "flip_train_tta" else "first",
        )
        for mode in modes
    }
    # The best accuracy; on a tie the simpler mode (within a mode, the larger penalty).
    mode = max(modes, key=lambda m: (best_of(cv[m])[0], -modes.index(m)))
    score, wd = best_of(cv[mode])
    train_rows = rows if mode == "flip_train_tta" else features
    train_labels = row_labels if mode == "flip_train_tta" else labels
    mean, sd = standardiser(train_rows)
    w, b = fit_logistic((train_rows - mean) / sd, train_labels, int(labels.max()) + 1, wd)
    weight, bias = fold_standardisation(w, b, mean, sd)
    return ProbeFit(weight, bias, wd, mode, score, int(folds.max()) + 1, cv)
