# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Fine-tuning on nature_12K: the original experiment, through the Python API
#
# Look at the data, compare the three freezing strategies of the original write-up, train
# the one validation chooses, test it, and look at its predictions. Open this file in
# Jupyter with Jupytext (`jupytext --to notebook examples/nature12k_experiment.py` makes an
# `.ipynb`), or run it as a script: `python examples/nature12k_experiment.py`.
#
# The data folder and the budget come from environment variables, so the same notebook runs
# the real experiment and a one-minute check (`tests/test_notebook.py`):
#
# | variable | default | what |
# |---|---|---|
# | `INAT_DATA` | `data/nature_12K/inaturalist_12K` | the photos (`inat-finetune download` puts them there) |
# | `INAT_BACKBONE` | `resnet50` | the ImageNet backbone |
# | `INAT_EPOCHS` | `5` | epochs per strategy in the comparison |
# | `INAT_FINAL_EPOCHS` | `15` | epochs for the chosen strategy |
# | `INAT_IMG_SIZE` | `224` | image side in pixels |
# | `INAT_OUTPUT` | `runs/notebook` | where the runs and `experiment.json` go |
# | `INAT_OPTIONS` | `{}` | more options for every run, as JSON: `{"augment": false}` |

# %%
import json
import os
from pathlib import Path

from inat_finetune import compare, load, train
from inat_finetune.data import make_split
from inat_finetune.reporting import class_samples_figure

DATA = os.environ.get("INAT_DATA", "data/nature_12K/inaturalist_12K")
BACKBONE = os.environ.get("INAT_BACKBONE", "resnet50")
EPOCHS = int(os.environ.get("INAT_EPOCHS", "5"))
FINAL_EPOCHS = int(os.environ.get("INAT_FINAL_EPOCHS", "15"))
IMG_SIZE = int(os.environ.get("INAT_IMG_SIZE", "224"))
OUTPUT = Path(os.environ.get("INAT_OUTPUT", "runs/notebook"))
# The same options for every run below: any TrainConfig field (`inat-finetune train --help`).
OPTIONS = {
    "backbone": BACKBONE,
    "img_size": IMG_SIZE,
    "output": str(OUTPUT),
    **json.loads(os.environ.get("INAT_OPTIONS", "{}")),
}

# %% [markdown]
# ## 1. The data
#
# Images per class in each split, split with the seed every run below uses: a nature_12K
# root's `val/` is the test set, validation is carved out of `train/`. (Training also drops
# any test photo that is a copy of a training photo, and says so.)

# %%
split = make_split(DATA)
counts = split.counts()
for cls in split.classes:
    print(f"{cls:>16}  " + "  ".join(f"{name} {counts[name][cls]:5d}" for name in counts))

# %%
# Ten random training photos of one class (a seeded random class).
class_samples_figure(split, "train", n=10, seed=0)

# %% [markdown]
# ## 2. Compare the three freezing strategies
#
# Each strategy trains on the same split with the same seed; the best is chosen by
# **validation** accuracy, never by test accuracy.

# %%
comparison = compare(data=DATA, epochs=EPOCHS, run_name="compare", **OPTIONS)
print(comparison.table)

# %%
comparison.figure()

# %% [markdown]
# ## 3. Train the chosen strategy longer, and test it

# %%
run = train(
    data=DATA,
    strategy=comparison.best_strategy,
    epochs=FINAL_EPOCHS,
    run_name=f"final-{comparison.best_strategy}",
    **OPTIONS,
)
print(f"{run.run_dir}: test accuracy {run.results['test_acc']:.2%}")

# %%
run.figures.curves()

# %%
run.figures.confusion()

# %% [markdown]
# ## 4. Predictions
#
# Random test photos with prediction and truth (mistakes framed in red), then the checkpoint
# loaded as a predictor, as it would be in another notebook or a service.

# %%
run.figures.prediction_grid(n=12)

# %%
predictor = load(run.run_dir)
test_set = split.samples("test")  # (path, class index), class by class
test_photos = [path for path, _ in test_set[:: max(1, len(test_set) // 5)]][:5]
predictions = predictor.predict(test_photos, top_k=3)
for photo, top in zip(test_photos, predictions, strict=True):
    print(photo.name, ", ".join(f"{cls} {p:.1%}" for cls, p in top))

# %%
# What this notebook found, in one file (tests/test_notebook.py reads it).
summary = {
    "classes": split.classes,
    "counts": counts,
    "comparison": comparison.rows,
    "best_strategy": comparison.best_strategy,
    "final_run": str(run.run_dir),
    "final_test_acc": run.results["test_acc"],
    "predictions": [
        {"path": str(photo), "top": top}
        for photo, top in zip(test_photos, predictions, strict=True)
    ],
}
(OUTPUT / "experiment.json").write_text(json.dumps(summary, indent=2))
