"""training.train.WeightAverage: the moving average of the weights that training validates with --ema_decay."""

from __future__ import annotations

import pytest
import torch

from training.train import WeightAverage


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)  # a frozen parameter is neither averaged nor swapped
    return model


def test_the_average_follows_the_weights_at_its_decay():
    model = _model()
    start = model.weight.detach().clone()
    average = WeightAverage(model, 0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update()
    torch.testing.assert_close(average.average[0], start + 0.1)
    average.update()
    torch.testing.assert_close(average.average[0], start + 0.1 + 0.9 * 0.1)


def test_swapped_in_puts_the_average_in_and_the_trained_weights_back():
    model = _model()
    average = WeightAverage(model, 0.5)
    with torch.no_grad():
        model.weight.add_(2.0)
    average.update()
    trained, bias = model.weight.detach().clone(), model.bias.detach().clone()
    with average.swapped_in():
        torch.testing.assert_close(model.weight, average.average[0])
        assert not torch.equal(model.weight, trained)
        torch.testing.assert_close(model.bias, bias)
    torch.testing.assert_close(model.weight, trained)
    with pytest.raises(RuntimeError), average.swapped_in():  # restored on the way out of an error too
        raise RuntimeError("validation failed")
    torch.testing.assert_close(model.weight, trained)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5])
def test_a_decay_outside_zero_one_is_refused(decay):
    with pytest.raises(ValueError, match="--ema_decay must be in"):
        WeightAverage(_model(), decay)
