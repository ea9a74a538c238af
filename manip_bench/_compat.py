"""The one module that touches Captum, Zennit and torch internals.

The adapters rely on names and behaviour outside those libraries' public APIs (private
modules, closure variables of Zennit's rules, torch's autograd node names). All of them
live here, behind small accessors, so that a new release that changes one of them fails
in one place with a clear message instead of deep inside an attack.

Each accessor is resolved on first use -- ``_compat.run_forward`` or ``from
manip_bench._compat import run_forward`` -- not when this module is imported (it imports
only the standard library and :mod:`manip_bench.errors` itself; torch, Captum and Zennit
are imported by the resolvers). Resolving runs a **probe**: it checks that the internal
exists and behaves as the package relies on, on tiny inputs, and otherwise raises
:class:`~manip_bench.errors.ManipBenchError` naming the installed release and the
:data:`TESTED` range. :func:`probe` runs one again, uncached.

A leaf module: it imports nothing from the package but :mod:`manip_bench.errors`.
"""
import contextlib
import functools
import importlib
import importlib.metadata
import warnings
from typing import Callable, NamedTuple

from .errors import ManipBenchError

#: lowest and highest release of each library the test suite passes with. setup.cfg's
#: install_requires allows exactly these: ``>=lowest,<next minor after highest``
#: (tests/test_compat.py checks that the two agree).
TESTED = {
    "torch": ("2.12.1", "2.15.0"),
    "captum": ("0.6.0", "0.9.0"),
    "zennit": ("0.5.1", "0.5.1"),
}


def tested_range(distribution):
    """``"0.6.0–0.9.0"``: the tested releases of ``distribution``, as messages show them."""
    low, high = TESTED[distribution]
    return low if low == high else f"{low}–{high}"


def installed(distribution):
    """The installed version of ``distribution`` (``"not installed"`` if none)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def unsupported(distribution, problem):
    """The message for an internal of ``distribution`` that is missing or changed."""
    return (f"{distribution} {installed(distribution)} is not supported: {problem}; "
            f"manip-bench is tested with {distribution} {tested_range(distribution)}")


class _Changed(Exception):
    """A probe found the internal, but it behaves differently (the message says how)."""


def _expect(condition, how):
    if not condition:
        raise _Changed(how)


class _Internal(NamedTuple):
    distribution: str
    #: what is relied on, as the error message names it
    private: str
    #: imports, probes and returns the accessor's value
    resolve: Callable


_INTERNALS = {}


def _internal(name, distribution, private):
    def register(resolve):
        _INTERNALS[name] = _Internal(distribution, private, resolve)
        return resolve
    return register


def names():
    """The accessors this module provides."""
    return sorted(_INTERNALS)


def probe(name):
    """Resolve the accessor ``name`` now (uncached) and return its value.

    Raises ManipBenchError naming the library, its installed version and the tested range
    when the internal is missing or behaves differently.
    """
    internal = _INTERNALS[name]
    # the library itself must import: an error there (a broken install) is not ours to rename
    importlib.import_module(internal.distribution)
    try:
        with warnings.catch_warnings(), _ProbeContext():  # Captum warns about probe inputs
            warnings.simplefilter("ignore")
            return internal.resolve()
    except ManipBenchError:
        raise  # a probe of another accessor this one builds on
    except (ImportError, AttributeError) as error:
        problem, cause = f"{internal.private} is missing ({error})", error
    except _Changed as error:
        problem, cause = f"{internal.private} {error}", error
    except Exception as error:  # noqa: BLE001 - any failure of a probe means the same
        problem = f"{internal.private} behaves differently ({type(error).__name__}: {error})"
        cause = error
    raise ManipBenchError(unsupported(internal.distribution, problem)) from cause


def __getattr__(name):
    if name not in _INTERNALS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = probe(name)
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__():
    return sorted(set(globals()) | set(_INTERNALS))


def closure_values(function):
    """``{name: value}`` of a Python function's closure variables (``{}`` if it has none)."""
    code = getattr(function, "__code__", None)
    if code is None:
        return {}
    return dict(zip(code.co_freevars, (cell.cell_contents for cell in function.__closure__ or ())))


def function_parts(value):
    """``(code, closure values)`` of a Python function, ``None`` for anything else."""
    code = getattr(value, "__code__", None)
    return None if code is None else (code, closure_values(value))


# --- tiny probe inputs ------------------------------------------------------------------

def _square(x):
    """``f(x) = |x|^2 / 2`` per row, one output: its gradient is ``x`` itself."""
    return (x * x / 2).sum(-1, keepdim=True)


def _probe_input():
    import torch
    return torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]])


class _ProbeContext:
    """Where probes run: with gradients on (a first use may come inside ``torch.no_grad()``
    or a backward pass), and with the caller's CPU torch and NumPy random streams given back
    after (probes initialise layers and draw noise)."""

    def __enter__(self):
        import numpy as np
        import torch
        self._torch, self._numpy = torch.random.get_rng_state(), np.random.get_state()
        self._grad = contextlib.ExitStack()
        self._grad.enter_context(torch.inference_mode(False))
        self._grad.enter_context(torch.enable_grad())
        return self

    def __exit__(self, *exc):
        import numpy as np
        import torch
        self._grad.close()
        torch.random.set_rng_state(self._torch)
        np.random.set_state(self._numpy)
        return False


# --- Captum -----------------------------------------------------------------------------

@_internal("run_forward", "captum", "captum._utils.common._run_forward")
def _run_forward():
    import torch
    from captum._utils.common import _run_forward as run_forward
    x = _probe_input()
    output = run_forward(lambda inputs: inputs * 2, (x,), 1, None)
    _expect(isinstance(output, torch.Tensor) and torch.equal(output, x[:, 1] * 2),
            "no longer returns the target's outputs of forward_func(*inputs)")
    return run_forward


@_internal("compute_gradients", "captum", "captum._utils.gradient.compute_gradients")
def _compute_gradients():
    import torch
    from captum._utils.gradient import compute_gradients
    from captum.attr import Saliency
    x = _probe_input().requires_grad_()
    (gradient,) = compute_gradients(_square, (x,), 0)
    _expect(torch.allclose(gradient, x.detach()), "no longer returns d output[target] / d input")
    _expect(Saliency(_square).gradient_func is compute_gradients,
            "is no longer the gradient_func of Captum's gradient methods")
    return compute_gradients


@_internal("has_default_gradient_func", "captum", "GradientAttribution.gradient_func")
def _has_default_gradient_func():
    compute_gradients = probe("compute_gradients")

    def has_default_gradient_func(method):
        """Whether a Captum gradient method computes gradients as Captum constructs it."""
        return getattr(method, "gradient_func", None) is compute_gradients

    return has_default_gradient_func


def _set_gradient_func(method, function):
    method.gradient_func = function


@_internal("set_gradient_func", "captum", "GradientAttribution.gradient_func")
def _set_gradient_func_checked():
    """Captum's gradient methods take every gradient from ``self.gradient_func``."""
    import torch
    from captum.attr import InputXGradient, IntegratedGradients, Saliency
    compute_gradients = probe("compute_gradients")
    baseline_x_gradient = probe("InputBaselineXGradient")
    calls = []

    def recording(forward_fn, inputs, target_ind=None, additional_forward_args=None):
        calls.append(True)
        return compute_gradients(forward_fn, inputs, target_ind, additional_forward_args)

    x = _probe_input()
    runs = ((Saliency, {}), (InputXGradient, {}), (IntegratedGradients, {"n_steps": 2}),
            (baseline_x_gradient, {"baselines": torch.zeros_like(x)}))
    for cls, kwargs in runs:
        method = cls(_square)
        _set_gradient_func(method, recording)
        calls.clear()
        method.attribute(x, target=0, **kwargs)
        _expect(calls, f"is not used by {cls.__name__}.attribute() any more")
    return _set_gradient_func


@_internal("InputBaselineXGradient", "captum",
           "captum.attr._core.gradient_shap.InputBaselineXGradient")
def _input_baseline_x_gradient():
    from captum.attr import GradientAttribution
    from captum.attr._core.gradient_shap import InputBaselineXGradient
    _expect(isinstance(InputBaselineXGradient, type)
            and issubclass(InputBaselineXGradient, GradientAttribution),
            "is no longer a Captum GradientAttribution")
    return InputBaselineXGradient


@_internal("approximation_parameters", "captum",
           "captum.attr._utils.approximation_methods.approximation_parameters")
def _approximation_parameters():
    from captum.attr._utils.approximation_methods import approximation_parameters
    for method in ("gausslegendre", "riemann_trapezoid"):
        step_sizes, alphas = approximation_parameters(method)
        steps, points = list(step_sizes(4)), list(alphas(4))
        _expect(len(steps) == len(points) == 4 and all(0 <= a <= 1 for a in points),
                f"no longer returns 4 step sizes and 4 points in [0, 1] for "
                f"method={method!r}, n_steps=4")
    _expect(abs(sum(approximation_parameters("gausslegendre")[0](4)) - 1) < 1e-6,
            "no longer returns Gauss-Legendre weights summing to 1")
    try:
        approximation_parameters("no such method")
    except ValueError:
        return approximation_parameters
    raise _Changed("no longer raises ValueError for an unknown method")


@_internal("SUPPORTED_LAYERS_WITH_RULES", "captum",
           "captum.attr._core.lrp.SUPPORTED_LAYERS_WITH_RULES")
def _supported_layers_with_rules():
    from captum.attr._core.lrp import SUPPORTED_LAYERS_WITH_RULES
    from torch import nn
    _expect(isinstance(SUPPORTED_LAYERS_WITH_RULES, dict)
            and {nn.Conv2d, nn.Linear} <= set(SUPPORTED_LAYERS_WITH_RULES)
            and all(callable(rule) for rule in SUPPORTED_LAYERS_WITH_RULES.values()),
            "is no longer a dict of layer types (Conv2d, Linear ...) -> default rule class")
    return SUPPORTED_LAYERS_WITH_RULES


@_internal("EpsilonRule", "captum", "captum.attr._utils.lrp_rules.EpsilonRule")
def _epsilon_rule():
    from captum.attr._utils.lrp_rules import EpsilonRule
    default = EpsilonRule().STABILITY_FACTOR
    _expect(isinstance(default, float) and default > 0
            and EpsilonRule(epsilon=0.5).STABILITY_FACTOR == 0.5,
            "no longer keeps its epsilon in STABILITY_FACTOR")
    return EpsilonRule


def _draw_noise(x, samples, stdev):
    """The Gaussian noise Captum's NoiseTunnel adds to ``samples`` copies of each row of ``x``.

    One draw for all copies, rows ``(image 0: copy 0..samples-1, image 1: ...)`` as
    ``x.repeat_interleave(samples, 0)`` lays them out.
    """
    import torch
    shape = (x.shape[0] * samples,) + tuple(x.shape[1:])
    noise = torch.normal(0, torch.tensor(stdev, device=x.device).repeat(shape))
    return noise.to(x.dtype)


def _draw_baseline_rows(baselines, rows):
    """The baseline row of each noisy row, as GradientShap draws them (before the noise)."""
    import numpy as np
    return np.random.choice(baselines, rows).tolist()


def _draw_path_points(like):
    """InputBaselineXGradient's point on the baseline-to-input path of each row of ``like``
    (drawn when it runs, after the noise)."""
    import numpy as np
    import torch
    return torch.tensor(np.random.uniform(0.0, 1.0, like.shape[0]), device=like.device,
                        dtype=like.dtype)


def _check_sampling_order():
    """NoiseTunnel(Saliency) and GradientShap equal the map rebuilt from the draws above."""
    import numpy as np
    import torch
    from captum.attr import GradientShap, NoiseTunnel, Saliency
    x, samples, stdev = _probe_input(), 3, 0.5
    torch.manual_seed(0)
    captum = NoiseTunnel(Saliency(_square)).attribute(
        x, nt_type="smoothgrad", nt_samples=samples, stdevs=stdev, target=0)
    torch.manual_seed(0)
    noisy = x.repeat_interleave(samples, 0) + _draw_noise(x, samples, stdev)
    ours = noisy.abs().view(x.shape[0], samples, -1).mean(1)
    _expect(torch.allclose(captum, ours), "NoiseTunnel draws its noise differently")

    baselines = torch.stack([torch.zeros(x.shape[1]), torch.full((x.shape[1],), 0.5)])
    torch.manual_seed(0)
    np.random.seed(0)
    captum = GradientShap(_square).attribute(
        x, baselines=baselines, n_samples=samples, stdevs=stdev, target=0)
    torch.manual_seed(0)
    np.random.seed(0)
    chosen = baselines[_draw_baseline_rows(len(baselines), samples * x.shape[0])]
    noisy = x.repeat_interleave(samples, 0) + _draw_noise(x, samples, stdev)
    points = _draw_path_points(noisy)[:, None]
    # InputBaselineXGradient: (input - baseline) * gradient at baseline + t (input - baseline)
    ours = (noisy - chosen) * (chosen + points * (noisy - chosen))
    ours = ours.view(x.shape[0], samples, -1).mean(1)
    _expect(torch.allclose(captum, ours), "GradientShap draws its samples differently")


_SAMPLING = "NoiseTunnel's and GradientShap's order of random draws"


@_internal("draw_noise", "captum", _SAMPLING)
def _draw_noise_checked():
    _check_sampling_order()
    return _draw_noise


@_internal("draw_baseline_rows", "captum", _SAMPLING)
def _draw_baseline_rows_checked():
    _check_sampling_order()
    return _draw_baseline_rows


@_internal("draw_path_points", "captum", _SAMPLING)
def _draw_path_points_checked():
    _check_sampling_order()
    return _draw_path_points


# --- Zennit -----------------------------------------------------------------------------

class BranchLayout(NamedTuple):
    """How a Zennit rule splits a layer into branches (one per input modifier)."""

    branches: int
    #: branches whose input is ``x.clamp(max=0)`` (all zeros when x is a ReLU output)
    zero_after_relu: tuple
    #: branches whose input is ``x.clamp(min=0)`` (x itself when x is a ReLU output)
    same_after_relu: tuple
    #: branch that is the plain layer (its input unmodified), used only as a sign mask
    mask_only: int = None


def _rule_stabilizer(rule):
    """The stabiliser a rule's gradient mapper divides by (``None`` if it has none)."""
    return closure_values(rule.gradient_mapper).get("stabilizer_fn")


def _rule_gamma(rule):
    """Gamma's gamma, read from its first parameter modifier (``None`` if absent)."""
    from zennit.core import ParamMod
    return closure_values(ParamMod.ensure(rule.param_modifiers[0]).modifier).get("gamma")


def _rule_box_bounds(rule):
    """ZBox's ``(low, high)``, read from its second and third input modifiers."""
    return (closure_values(rule.input_modifiers[1])["low"],
            closure_values(rule.input_modifiers[2])["high"])


@functools.cache
def _stock_code():
    from zennit.rules import Epsilon, Gamma, ZPlus
    return {cls: (cls().gradient_mapper.__code__, cls().reducer.__code__)
            for cls in (Epsilon, ZPlus, Gamma)}


def _is_stock_rule(rule, cls):
    """Whether ``rule`` is a ``cls`` (Epsilon, ZPlus or Gamma) with Zennit's own gradient
    mapper and reducer."""
    return isinstance(rule, cls) and (rule.gradient_mapper.__code__,
                                      rule.reducer.__code__) == _stock_code()[cls]


@functools.cache
def _branch_layouts():
    from zennit.rules import AlphaBeta, Epsilon, Gamma, ZPlus
    return {
        ZPlus: BranchLayout(2, (1,), (0,)),
        AlphaBeta: BranchLayout(4, (1, 3), (0, 2)),
        Gamma: BranchLayout(5, (1, 3), (0, 2), 4),
        Epsilon: BranchLayout(1, (), ()),
    }


#: names of torch's autograd nodes: a ReLU, and the nodes a ReLU output's zeros pass through
#: unchanged (``IdentityBackward`` is Zennit's hook anchor, ``zennit.core.Identity``)
RELU_NODE = "ReluBackward"
TRANSPARENT_NODES = ("CloneBackward", "IdentityBackward", "ViewBackward", "ReshapeAliasBackward",
                     "UnsafeViewBackward", "MaxPool2DWithIndicesBackward",
                     "AdaptiveAvgPool2DBackward", "AvgPool2DBackward")


def _check_zennit_rules():
    """Zennit's rules keep their parameters and branches where the accessors read them."""
    import torch
    from zennit.core import Identity, Stabilizer
    from zennit.rules import Epsilon, Gamma, ZBox
    stabilizer = _rule_stabilizer(Epsilon(epsilon=0.25))
    _expect(type(stabilizer) is Stabilizer and stabilizer.epsilon == 0.25
            and not stabilizer.clip and not stabilizer.norm_scale,
            "Epsilon's gradient mapper no longer holds a Stabilizer(epsilon) as stabilizer_fn")
    _expect(_rule_gamma(Gamma(gamma=0.75)) == 0.75,
            "Gamma's first parameter modifier no longer holds gamma")
    _expect(_rule_box_bounds(ZBox(low=-2.0, high=3.0)) == (-2.0, 3.0),
            "ZBox's input modifiers no longer hold low and high")
    _expect(all(_is_stock_rule(cls(), cls) for cls in _stock_code()),
            "rules of one class no longer share their gradient mapper's and reducer's code")
    t = torch.tensor([-1.5, 0.0, 2.0])
    for cls, layout in _branch_layouts().items():
        rule = cls()
        _expect(len(rule.input_modifiers) == len(rule.param_modifiers) == layout.branches
                and all(torch.equal(mod(t), t) for mod in rule.output_modifiers),
                f"{cls.__name__} no longer has {layout.branches} branch(es) with identity "
                f"output modifiers")
        expected = {**{i: t.clamp(max=0) for i in layout.zero_after_relu},
                    **{i: t.clamp(min=0) for i in layout.same_after_relu}}
        if layout.mask_only is not None:
            expected[layout.mask_only] = t
        _expect(all(torch.equal(rule.input_modifiers[i](t), value) for i, value in expected.items()),
                f"{cls.__name__}'s branches no longer split the input into positive and "
                f"negative parts in Zennit 0.5's order")
    (anchor,) = Identity.apply(t.clone().requires_grad_())
    _expect(anchor.grad_fn.name().startswith(TRANSPARENT_NODES),
            "zennit.core.Identity's autograd node is no longer named IdentityBackward")
    _check_zennit_backward()


def _composite_hooks(composite):
    """The rule hooks a registered Zennit composite has attached to the model's layers."""
    return list(composite.hook_refs)


def _check_zennit_backward():
    """A composite keeps its hooks in ``hook_refs``, and a rule's relevance can be
    differentiated again (Zennit 0.5.0's BasicHook.backward detaches it)."""
    import torch
    from torch import nn
    from zennit.composites import LayerMapComposite
    from zennit.rules import Epsilon
    model = nn.Sequential(nn.Linear(3, 2))
    composite = LayerMapComposite([(nn.Linear, Epsilon())])
    x = _probe_input().requires_grad_()
    with torch.enable_grad(), composite.context(model) as modified:
        hooks = _composite_hooks(composite)
        output = modified(x)
        (relevance,) = torch.autograd.grad(output, x, torch.ones_like(output), create_graph=True)
    _expect(len(hooks) == 1 and isinstance(hooks[0], Epsilon),
            "a registered composite no longer lists its rule hooks in hook_refs")
    _expect(relevance.requires_grad, "BasicHook.backward no longer keeps the graph of the "
            "relevance (create_graph), so explanations cannot be differentiated")


def _zennit(name, private, value):
    def resolve():
        _check_zennit_rules()
        return value
    _internal(name, "zennit", private)(resolve)


_zennit("rule_stabilizer", "zennit.rules.*.gradient_mapper's closure variable stabilizer_fn",
        _rule_stabilizer)
_zennit("rule_gamma", "zennit.rules.Gamma's GammaMod closure variable gamma", _rule_gamma)
_zennit("rule_box_bounds", "zennit.rules.ZBox's input modifiers' closure variables low, high",
        _rule_box_bounds)
_zennit("is_stock_rule", "the code of zennit.rules' gradient mappers and reducers",
        _is_stock_rule)
_zennit("composite_hooks", "zennit.core.Composite.hook_refs / BasicHook.backward",
        _composite_hooks)


@_internal("branch_layouts", "zennit", "the branch layout of zennit.rules ZPlus, AlphaBeta, "
           "Gamma and Epsilon")
def _branch_layouts_checked():
    _check_zennit_rules()
    return dict(_branch_layouts())


# --- torch ------------------------------------------------------------------------------

def _conv_forward(module, input, weight, bias):
    """A convolution layer's forward with other weight and bias (its padding mode kept)."""
    return module._conv_forward(input, weight, bias)


@_internal("conv_forward", "torch", "torch.nn.Conv2d._conv_forward")
def _conv_forward_checked():
    import torch
    from torch import nn
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.linspace(-1, 1, 2 * 5 * 5).view(1, 2, 5, 5)
    with torch.no_grad():
        same = _conv_forward(conv, x, conv.weight, conv.bias)
        doubled = _conv_forward(conv, x, conv.weight * 2, None)
        _expect(torch.allclose(same, conv(x), atol=1e-5)
                and torch.allclose(doubled, 2 * (conv(x) - conv.bias[:, None, None]), atol=1e-5),
                "no longer computes the layer's convolution with the given weight and bias")
    return _conv_forward


def _tensor_version(tensor):
    """A counter of the tensor's in-place changes."""
    return tensor._version


@_internal("tensor_version", "torch", "torch.Tensor._version")
def _tensor_version_checked():
    import torch
    t = torch.zeros(2)
    before = _tensor_version(t)
    t.add_(1)
    _expect(isinstance(before, int) and _tensor_version(t) > before,
            "no longer counts in-place changes")
    return _tensor_version


@_internal("autograd_node_names", "torch", "the names of torch's autograd nodes (grad_fn.name())")
def _autograd_node_names():
    import torch
    from torch.nn import functional as F
    x = torch.linspace(-1, 1, 16).view(1, 1, 4, 4).requires_grad_()
    _expect(torch.relu(x).grad_fn.name().startswith(RELU_NODE), f"a ReLU's is not {RELU_NODE}")
    passing = {"clone": x.clone(), "view": x.view(1, 16), "reshape": x.reshape(16),
               "max_pool2d": F.max_pool2d(x, 2), "avg_pool2d": F.avg_pool2d(x, 2),
               "adaptive_avg_pool2d": F.adaptive_avg_pool2d(x, 2)}
    unknown = {op: y.grad_fn.name() for op, y in passing.items()
               if not y.grad_fn.name().startswith(TRANSPARENT_NODES)}
    _expect(not unknown, f"have new names: {unknown}")
    return RELU_NODE, TRANSPARENT_NODES


def _uncompiled(model):
    """The eager module behind a ``torch.compile``d one (the model itself otherwise)."""
    import torch
    compiled = getattr(torch._dynamo.eval_frame, "OptimizedModule", ())
    return model._orig_mod if isinstance(model, compiled) else model


@_internal("uncompiled", "torch", "torch.compile's OptimizedModule._orig_mod")
def _uncompiled_checked():
    import torch
    from torch import nn
    layer = nn.Linear(2, 2)
    _expect(_uncompiled(torch.compile(layer)) is layer, "no longer keeps the original module")
    return _uncompiled
