"""evaluate(): accuracy and the logit-scale measurements, against values computed by hand."""

import math

import pytest
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


def test_the_feature_hook_is_removed_when_evaluation_fails():
    head = MultiCenterHead(2, 2)
    model = nn.Sequential(nn.Identity(), head)

    def broken_loader():
        yield torch.randn(3, 2), torch.tensor([0, 1, 0])
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        evaluate(model, broken_loader(), Runtime(torch.device("cpu")), head)
    assert not head._forward_hooks


def test_eval_set_cache_keeps_an_empty_shard_and_matches_the_dataset():
    from torch.utils.data import Subset, TensorDataset

    from mcc_train.data import cache_in_memory

    data = TensorDataset(torch.randn(5, 1, 4, 4), torch.arange(5))
    assert len(cache_in_memory(Subset(data, []))) == 0
    cached = cache_in_memory(Subset(data, [4, 1]))
    assert torch.equal(cached.tensors[0], data.tensors[0][[4, 1]]) and cached.tensors[1].tolist() == [4, 1]
    assert cache_in_memory(data, max_bytes=10) is data  # too large: left as it is
