"""evaluate(): accuracy and the logit-scale measurements, against values computed by hand."""

import math

import torch
from torch import nn

from mcc_train.head import MultiCenterHead
from mcc_train.train import Runtime, evaluate


def test_margin_and_sub_center_spread_by_hand():
    head = MultiCenterHead(2, 2, sigma_scale=1.0, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # logits = x
        head.log_var.zero_()  # std = 1 everywhere: logit_std = |x|
    model = nn.Sequential(nn.Identity(), head)
    x = torch.tensor([[3.0, 4.0], [2.0, 0.0]])
    target = torch.tensor([1, 0])
    loader = [(x, target)]
    metrics = evaluate(model, loader, Runtime(torch.device("cpu")), head)
    assert metrics["top1"] == 100.0
    # margins: 4 - 3 and 2 - 0; spread: |x| = 5 and 2
    assert metrics["logit_margin"] == 1.5
    assert math.isclose(metrics["logit_spread"], 3.5, rel_tol=1e-6)
    assert not head.training and not head._forward_hooks  # eval mode, and the hook is gone
    linear = evaluate(nn.Sequential(nn.Identity(), head.to_linear()), loader, Runtime(torch.device("cpu")))
    assert linear["logit_margin"] == 1.5 and "logit_spread" not in linear
