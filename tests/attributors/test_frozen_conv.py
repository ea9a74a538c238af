"""``FrozenConv2d`` (the prepared copy's convolution) computes what ``nn.Conv2d`` computes."""
import pytest
import torch
from torch import nn

from manip_bench.attributors.base import FrozenConv2d, prepare_model


@pytest.mark.parametrize("options", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2),
    dict(kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    dict(kernel_size=4, stride=3, padding=2, groups=2, bias=False),
])
def test_output_gradient_and_second_derivative_match_conv2d(options):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, **options).double()
    frozen = prepare_model(nn.Sequential(conv))[0]
    assert type(frozen) is FrozenConv2d and not frozen.weight.requires_grad
    x = torch.rand(2, 4, 11, 13, dtype=torch.float64, requires_grad=True)
    seed = torch.rand_like(conv(x))

    def first_and_second(layer):
        (gradient,) = torch.autograd.grad(layer(x), x, seed, create_graph=True)
        weighted = seed.detach().requires_grad_()
        (inner,) = torch.autograd.grad(layer(x), x, weighted, create_graph=True)
        (second,) = torch.autograd.grad(inner.square().sum(), weighted)
        return layer(x), gradient, second

    for mine, reference in zip(first_and_second(frozen), first_and_second(conv)):
        assert torch.allclose(mine, reference, rtol=1e-10, atol=1e-12)


def test_convolutions_it_cannot_express_stay_plain():
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding="same"),
                          nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"))
    assert [type(m) for m in prepare_model(model)] == [nn.Conv2d, nn.Conv2d]


def test_double_backprop_computes_no_weight_shaped_convolution():
    """The point of FrozenConv2d: one convolution per layer when differentiating the gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("convolution", "convolution_backward"):
                Count.calls += 1
            return func(*args, **(kwargs or {}))

    frozen = prepare_model(nn.Sequential(nn.Conv2d(3, 5, 3, padding=1)))
    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    (gradient,) = torch.autograd.grad(frozen(x).square().sum(), x, create_graph=True)
    with Count():
        gradient.square().sum().backward()
    assert Count.calls == 2  # through the gradient's transposed convolution, then the forward
