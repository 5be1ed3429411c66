"""Every strategy's exact trainable set, checked against numbers computed by hand."""

from __future__ import annotations

import pytest
import torch

from inat_finetune.errors import UserError
from inat_finetune.models.backbones import get_model
from inat_finetune.models.freezing import apply_strategy, frozen_batchnorm_layers
from inat_finetune.tasks.classification import FineTuneModule

NUM_CLASSES = 10

# ResNet50 by hand. Head: 2048 * 10 + 10.
RESNET50_HEAD = 2048 * NUM_CLASSES + NUM_CLASSES  # 20,490
RESNET50_TOTAL = 25_557_032 - (2048 * 1000 + 1000) + RESNET50_HEAD  # published count, new head
# BatchNorm channels: stem 64; a bottleneck of width w has BNs of w, w and 4w; the first block
# of each stage adds a downsample BN of 4w. Stages (width, blocks): (64,3) (128,4) (256,6) (512,3).
RESNET50_BN_CHANNELS = 64 + sum(
    blocks * (w + w + 4 * w) + 4 * w for w, blocks in ((64, 3), (128, 4), (256, 6), (512, 3))
)
# freeze_k_percent 0.25: 53 convs + 53 BNs x 2 = 159 backbone tensors; floor(0.25 * 159) = 39
# frozen: stem (3), layer1 (12 + 9 + 9), layer2.0 conv1, bn1 (w, b), conv2, bn2 (w, b).
RESNET50_K25_FROZEN = (
    (3 * 64 * 7 * 7 + 2 * 64)  # stem conv1 + bn1
    + (64 * 64 + 128 + 64 * 64 * 9 + 128 + 64 * 256 + 512 + 64 * 256 + 512)  # layer1.0
    + 2 * (256 * 64 + 128 + 64 * 64 * 9 + 128 + 64 * 256 + 512)  # layer1.1, layer1.2
    + (256 * 128 + 256 + 128 * 128 * 9 + 256)  # layer2.0 conv1, bn1, conv2, bn2
)

# MobileNetV2 by hand, from the paper's table of (expansion t, channels c, repeats n).
MOBILENET_HEAD = 1280 * NUM_CLASSES + NUM_CLASSES
MOBILENET_TOTAL = 3_504_872 - (1280 * 1000 + 1000) + MOBILENET_HEAD


def _mobilenet_v2_bn_channels() -> int:
    channels, cin = 32 + 1280, 32  # stem and last 1x1 conv
    for t, c, n in (
        (1, 16, 1),
        (6, 24, 2),
        (6, 32, 3),
        (6, 64, 4),
        (6, 96, 3),
        (6, 160, 3),
        (6, 320, 1),
    ):
        for _ in range(n):
            hidden = cin * t
            # expand BN (only when t > 1), depthwise BN, project BN
            channels += (hidden if t > 1 else 0) + hidden + c
            cin = c
    return channels


# 52 convs + 52 BNs x 2 = 156 backbone tensors; floor(0.25 * 156) = 39 frozen: features.0 (3),
# features.1 (6), features.2-4 (9 each), features.5 expand conv and its BN (3).
MOBILENET_K25_FROZEN = (
    (3 * 32 * 9 + 64)  # features.0
    + (32 * 9 + 64 + 32 * 16 + 32)  # features.1: depthwise, project
    + (16 * 96 + 192 + 96 * 9 + 192 + 96 * 24 + 48)  # features.2
    + (24 * 144 + 288 + 144 * 9 + 288 + 144 * 24 + 48)  # features.3
    + (24 * 144 + 288 + 144 * 9 + 288 + 144 * 32 + 64)  # features.4
    + (32 * 192 + 384)  # features.5 expand conv + BN
)

EXPECTED = {
    "resnet50": {
        "freeze_last": RESNET50_HEAD,
        "freeze_except_bn_and_fc": 2 * RESNET50_BN_CHANNELS + RESNET50_HEAD,
        "freeze_k_percent": RESNET50_TOTAL - RESNET50_K25_FROZEN,
        "none": RESNET50_TOTAL,
    },
    "mobilenet_v2": {
        "freeze_last": MOBILENET_HEAD,
        "freeze_except_bn_and_fc": 2 * _mobilenet_v2_bn_channels() + MOBILENET_HEAD,
        "freeze_k_percent": MOBILENET_TOTAL - MOBILENET_K25_FROZEN,
        "none": MOBILENET_TOTAL,
    },
}
TOTAL = {"resnet50": RESNET50_TOTAL, "mobilenet_v2": MOBILENET_TOTAL}


def test_hand_computed_constants_match_known_figures():
    assert RESNET50_BN_CHANNELS * 2 == 53_120
    assert _mobilenet_v2_bn_channels() * 2 == 34_112


@pytest.fixture(scope="module")
def networks():
    return {name: get_model(name, NUM_CLASSES, weights="none") for name in EXPECTED}


@pytest.mark.parametrize("name", list(EXPECTED))
@pytest.mark.parametrize(
    "strategy", ["freeze_last", "freeze_except_bn_and_fc", "freeze_k_percent", "none"]
)
def test_trainable_parameter_counts(networks, name, strategy):
    built = networks[name]
    summary = apply_strategy(built.model, built.head, strategy, freeze_percent=0.25)
    assert summary.total_params == TOTAL[name]
    assert summary.trainable_params == EXPECTED[name][strategy]
    assert summary.trainable_params == sum(
        p.numel() for p in built.model.parameters() if p.requires_grad
    )


def test_freeze_k_percent_freezes_leading_tensors(networks):
    built = networks["resnet50"]
    apply_strategy(built.model, built.head, "freeze_k_percent", 0.25)
    frozen = [n for n, p in built.model.named_parameters() if not p.requires_grad]
    assert len(frozen) == 39
    assert frozen[0] == "conv1.weight" and frozen[-1] == "layer2.0.bn2.bias"
    assert built.model.layer2[0].conv3.weight.requires_grad
    # 0 and 1 are the extremes: nothing frozen, or only the head trains.
    assert (
        apply_strategy(built.model, built.head, "freeze_k_percent", 0.0).trainable_params
        == RESNET50_TOTAL
    )
    assert (
        apply_strategy(built.model, built.head, "freeze_k_percent", 1.0).trainable_params
        == RESNET50_HEAD
    )


def test_bn_and_fc_trains_exactly_norm_affine_and_head(networks):
    built = networks["mobilenet_v2"]
    apply_strategy(built.model, built.head, "freeze_except_bn_and_fc")
    for name, param in built.model.named_parameters():
        owner = built.model.get_submodule(name.rsplit(".", 1)[0])
        expected = isinstance(owner, torch.nn.BatchNorm2d) or name.startswith("classifier.1")
        assert param.requires_grad == expected, name


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_freeze_percent_outside_unit_interval_is_refused(networks, bad):
    built = networks["resnet50"]
    with pytest.raises(UserError, match="--freeze-percent"):
        apply_strategy(built.model, built.head, "freeze_k_percent", bad)


def test_unknown_strategy_is_refused(networks):
    built = networks["resnet50"]
    with pytest.raises(UserError, match="--strategy freeze_everything: unknown"):
        apply_strategy(built.model, built.head, "freeze_everything")


def _running_mean_after_training_step(
    strategy: str, frozen_bn: str
) -> tuple[torch.Tensor, torch.Tensor]:
    built = get_model("mobilenet_v2", 3, weights="none")
    apply_strategy(built.model, built.head, strategy)
    card = {"class_names": ["a", "b", "c"]}
    module = FineTuneModule(built.model, card, frozen_bn=frozen_bn)
    module.train()  # what Lightning does at every epoch start
    bn = built.model.features[0][1]
    before = bn.running_mean.clone()
    module(torch.randn(4, 3, 32, 32) * 3 + 1)
    return before, bn.running_mean


def test_frozen_batchnorm_held_in_eval_mode_keeps_running_stats():
    before, after = _running_mean_after_training_step("freeze_last", "eval")
    assert torch.equal(before, after)


def test_frozen_batchnorm_in_train_mode_updates_running_stats_like_the_seed():
    before, after = _running_mean_after_training_step("freeze_last", "train")
    assert not torch.equal(before, after)


def test_trainable_batchnorm_always_updates_running_stats():
    before, after = _running_mean_after_training_step("freeze_except_bn_and_fc", "eval")
    assert not torch.equal(before, after)
    built = get_model("mobilenet_v2", 3, weights="none")
    apply_strategy(built.model, built.head, "freeze_except_bn_and_fc")
    assert frozen_batchnorm_layers(built.model) == []
