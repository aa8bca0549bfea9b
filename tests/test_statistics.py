"""BatchNorm statistics re-estimation against per-batch statistics computed by hand."""

import pytest
import torch
from torch import nn

from hf_sta.statistics import reestimate_batchnorm


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        nn.BatchNorm1d(5),
    )


def test_running_stats_are_exact_averages_of_batch_statistics():
    model = _net()
    model.eval()
    model[1].running_mean.fill_(7.0)  # stale statistics from "the base"
    batches = [torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    reestimate_batchnorm(model, batches)
    assert not model.training and model[1].momentum == 0.1  # restored
    with torch.no_grad():
        features = [model[0](x) for x in batches]
        means = torch.stack([f.mean(dim=(0, 2, 3)) for f in features])
        variances = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in features])
    torch.testing.assert_close(model[1].running_mean, means.mean(0))
    torch.testing.assert_close(model[1].running_var, variances.mean(0))
    assert model[1].num_batches_tracked.item() == 3


def test_dict_batches_and_errors():
    model = _net()

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            return self.inner(pixel_values)

    wrapped = Wrapper(model)
    reestimate_batchnorm(wrapped, [{"pixel_values": torch.randn(4, 3, 8, 8)}])
    assert model[1].num_batches_tracked.item() == 1
    with pytest.raises(ValueError, match="No batch"):
        reestimate_batchnorm(wrapped, [])
    linear = nn.Linear(2, 2)
    assert reestimate_batchnorm(linear, []) is linear  # nothing to do
