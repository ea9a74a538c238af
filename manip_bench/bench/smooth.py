"""The β-smoothing defence (Dombrowski et al. 2019, Sec. 4 and Fig. 4), swept over β.

The defence itself is a model transform (:mod:`manip_bench.defences`)::

    from manip_bench import attributors, defences, ManipulationAttack
    smoothed = defences.beta_smooth(model, 2.0)
    explain = attributors.create("zennit.epsilon", smoothed)  # any method
    attack = ManipulationAttack(smoothed, "captum.saliency")    # attacked and judged there

A sweep is an ordinary benchmark grid (:mod:`manip_bench.bench.grid`) whose methods are
each attributor without defence (β → ∞) and under ``beta=<β>`` for every β, plus
SmoothGrad (``captum.smoothgrad``, 10 samples) at noise levels σ as the comparison
defence. Every row records the time of one explanation (``explain_seconds``), so the
report can set the defences' cost beside their effect.
"""
from ..defaults import BETAS as DEFAULT_BETAS  # the sweep's β (ReLU is added as β → ∞)
from ..defaults import SMOOTHGRAD_STDEVS as DEFAULT_STDEVS
from ..defences import positive_numbers
from .grid import BUNDLED, GridMethod, build_grid, resolve_attributors
SMOOTHGRAD = "captum.smoothgrad"
SMOOTHGRAD_SAMPLES = 10


def sweep_methods(attributors=("captum.saliency",), betas=DEFAULT_BETAS, stdevs=DEFAULT_STDEVS,
                  samples=SMOOTHGRAD_SAMPLES, relu=True):
    """The methods of a sweep: each attributor on ReLU (if ``relu``) and at every β, then
    SmoothGrad with ``samples`` noisy copies at every σ in ``stdevs`` (empty: none)."""
    names = resolve_attributors(attributors)
    methods = []
    for name in names:
        if relu:
            methods.append(GridMethod(name))
        methods += [GridMethod(name, f"beta={beta:g}")
                    for beta in positive_numbers(betas, "betas", allow_empty=True)]
    methods += [GridMethod(SMOOTHGRAD, None, {"samples": int(samples), "stdev": stdev})
                for stdev in positive_numbers(stdevs, "SmoothGrad σ values",
                                             allow_empty=True)]
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
