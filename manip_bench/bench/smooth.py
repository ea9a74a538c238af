"""The β-smoothing defence (Dombrowski et al. 2019, Sec. 4 and Fig. 4), swept over β.

The defence itself is one argument of the registry::

    from manip_bench import attributors, ManipulationAttack
    explain = attributors.create("captum.saliency", model, smooth_beta=2.0)
    output, relevance = explain(x, target)          # the map of the Softplus(2) network

    attack = ManipulationAttack(model, "captum.saliency", smooth_beta=2.0)
    result = attack(x, attack.target_maps(x_target))  # attacked and judged on that network

It applies to gradient-type methods only (``attributors.GROUPS["gradient"]``); LRP rules
are not smoothed (on a softplus network they no longer conserve relevance), so
``zennit.*`` and ``captum.lrp`` refuse ``smooth_beta``.

A sweep is an ordinary benchmark grid (:mod:`manip_bench.bench.grid`) whose methods are
each attributor on the ReLU network (the unsmoothed baseline, β → ∞) and at every β,
plus SmoothGrad (``captum.smoothgrad``, 10 samples) at noise levels σ as the comparison
defence. Every row records the time of one explanation (``explain_seconds``), so the
report can set the defences' cost beside their effect.
"""
from .. import attributors as registry
from ..errors import ManipBenchError
from .grid import BUNDLED, Method, build_grid, resolve_attributors

#: β values of the default sweep (log-spaced; ReLU is added as β → ∞)
DEFAULT_BETAS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
#: SmoothGrad noise levels, as a fraction of the input range ([0, 1] images: range 1)
DEFAULT_STDEVS = (0.005, 0.01, 0.02, 0.05)
SMOOTHGRAD = "captum.smoothgrad"
SMOOTHGRAD_SAMPLES = 10


def _numbers(values, what):
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ManipBenchError(f"{what} must be numbers, e.g. 1,2,5; got {values!r}") from None
    if any(not v > 0 for v in numbers):
        raise ManipBenchError(f"{what} must be positive, got {numbers}")
    return numbers


def sweep_methods(attributors=("captum.saliency",), betas=DEFAULT_BETAS, stdevs=DEFAULT_STDEVS,
                  samples=SMOOTHGRAD_SAMPLES, relu=True):
    """The methods of a sweep: each attributor on ReLU (if ``relu``) and at every β, then
    SmoothGrad with ``samples`` noisy copies at every σ in ``stdevs`` (empty: none)."""
    names = resolve_attributors(attributors)
    refused = [n for n in names if "smooth_beta" not in registry.options(n)]
    if refused:
        raise ManipBenchError(
            f"{', '.join(refused)}: β-smoothing applies to gradient-type methods only "
            f"(LRP is not smoothed); choose from {', '.join(registry.GROUPS['gradient'])}")
    methods = []
    for name in names:
        if relu:
            methods.append(Method(name))
        methods += [Method(name, beta) for beta in _numbers(betas, "betas")]
    methods += [Method(SMOOTHGRAD, None, {"samples": int(samples), "stdev": stdev})
                for stdev in _numbers(stdevs, "SmoothGrad σ values")]
    return methods


def make_sweep(attributors=("captum.saliency",), betas=DEFAULT_BETAS, stdevs=DEFAULT_STDEVS,
               models=("cifar_vgg",), pairs=BUNDLED, n=20, seed=0, preset="auto",
               samples=SMOOTHGRAD_SAMPLES, relu=True, **overrides):
    """A :class:`~manip_bench.bench.grid.Grid` (kind ``smooth``) for the β sweep.

    Run it with :func:`~manip_bench.bench.grid.run_grid` and summarise it with
    :func:`~manip_bench.bench.report.report`, which adds the Fig. 4 plot and table.
    """
    methods = sweep_methods(attributors, betas, stdevs, samples, relu)
    return build_grid(methods, models, pairs, n, seed, preset, overrides, "smooth")


__all__ = ["DEFAULT_BETAS", "DEFAULT_STDEVS", "SMOOTHGRAD", "SMOOTHGRAD_SAMPLES", "make_sweep",
           "sweep_methods"]
