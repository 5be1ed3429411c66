"""Named stages, schedules of unfreezing, and the errors that name the valid stages."""

from __future__ import annotations

import pytest
import torchvision
from torch import nn

from inat_finetune.errors import UserError
from inat_finetune.models.backbones import get_model, replace_classifier
from inat_finetune.models.stages import (
    UnfreezePlan,
    apply_start,
    backbone_stages,
    parse_schedule,
    stage_index,
    stage_names,
)


class TinyResNet(nn.Module):
    """ResNet's layout (conv1, bn1, layer1..layer4, fc) at a size that trains in milliseconds."""

    def __init__(self, num_classes: int = 3, width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        for i in range(1, 5):
            block = nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
            )
            setattr(self, f"layer{i}", block)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def _check_partition(model: nn.Module, stages) -> None:
    names = [p for s in stages for p in s.params]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(names) == len(set(names))  # every parameter in exactly one stage


def test_resnet50_stages_are_its_blocks():
    model = torchvision.models.resnet50()
    head = replace_classifier(model, 10)
    stages = backbone_stages(model, head)
    assert stage_names(stages) == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert stages[0].params == ("conv1.weight", "bn1.weight", "bn1.bias")
    assert stages[-1].params == ("fc.weight", "fc.bias")
    _check_partition(model, stages)


def test_mobilenet_v2_stages_are_its_feature_blocks():
    built = get_model("mobilenet_v2", num_classes=3, weights="none")
    stages = backbone_stages(built.model, built.head)
    assert stage_names(stages) == [f"features.{i}" for i in range(19)] + ["head"]
    _check_partition(built.model, stages)


def test_timm_stages_come_from_timms_group_matcher():
    built = get_model("tf_efficientnet_lite0", num_classes=3, weights="none")
    stages = backbone_stages(built.model, built.head)
    assert stage_names(stages) == ["stem"] + [f"blocks.{i}" for i in range(7)] + ["head"]
    assert "conv_head.weight" in stages[-2].params  # the last conv trains with the last block
    _check_partition(built.model, stages)


def test_unknown_stage_is_a_user_error_listing_the_stages():
    model = TinyResNet()
    stages = backbone_stages(model, "fc")
    with pytest.raises(UserError) as caught:
        stage_index(stages, "layer9")
    message = str(caught.value)
    assert message.startswith("--train-from layer9: no such stage")
    assert "stem, layer1, layer2, layer3, layer4, then head" in message
    assert stage_index(stages, "all") == 0 and stage_index(stages, "head") == 5


@pytest.mark.parametrize(
    "text, problem",
    [
        ("2:head", "epoch 0"),
        ("0:head,head", "EPOCH:STAGE"),
        ("0:head,3:layer4,3:layer3", "increase"),
    ],
)
def test_schedule_syntax_errors(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_schedule(text)


def test_schedule_must_only_unfreeze_more():
    stages = backbone_stages(TinyResNet(), "fc")
    with pytest.raises(UserError, match="at least as much"):
        UnfreezePlan.build(stages, parse_schedule("0:layer3,2:layer4"), "--unfreeze-schedule")


def test_trainable_set_per_epoch_under_a_gradual_schedule():
    model = TinyResNet()
    stages = backbone_stages(model, "fc")
    plan = UnfreezePlan.build(stages, parse_schedule("0:head,2:layer4,4:layer3"), "--x")
    expected = {
        0: {"fc"},
        1: {"fc"},
        2: {"fc", "layer4"},
        3: {"fc", "layer4"},
        4: {"fc", "layer4", "layer3"},
        9: {"fc", "layer4", "layer3"},
    }
    for epoch, modules in expected.items():
        apply_start(model, stages, plan.start_at(epoch))
        trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == modules, epoch
    never = plan.unfreeze_epoch(0)
    assert never > 10**6
    assert [plan.unfreeze_epoch(i) for i in range(6)] == [never, never, never, 4, 2, 0]
    assert plan.last_change == 4
