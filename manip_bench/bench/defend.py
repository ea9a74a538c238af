"""The defence table: every attackable method under every defence, robustness beside cost.

A defence grid (kind ``defend``) is an ordinary benchmark grid (:mod:`.grid`, so it is
sharded and resumable) whose methods are each attributor

- without defence,
- β-smoothed at every β (:class:`~manip_bench.defences.BetaSmoothing`),
- on the fine-tuned model (:class:`~manip_bench.defences.FineTuned`, e.g.
  ``cifar_vgg_robust``),

plus SmoothGrad (``captum.smoothgrad``) at the noise level that Theorem 2 of Dombrowski et
al. (2019) matches to each β, ``σ = log(2) √(2π) / β``, as the sampling counterpart of
β-smoothing the gradient. Robustness is what the attack reaches (target PCC); the cost
side -- clean accuracy, and how faithful the clean explanation stays -- is measured by
:mod:`.costs` from the folder afterwards.
"""
import math

from .. import defences, models
from ..attributors import create
from ..defaults import DEFENCE_BETAS as DEFAULT_BETAS
from ..defaults import FINETUNED_MODEL as DEFAULT_FINETUNED
from ..errors import ManipBenchError
from .grid import BUNDLED, GridMethod, build_grid, parse_model, resolve_attributors
from .smooth import SMOOTHGRAD, SMOOTHGRAD_SAMPLES


def matched_stdev(beta):
    """SmoothGrad's σ matched to softplus β (Dombrowski et al. 2019, Theorem 2)."""
    return math.log(2.0) * math.sqrt(2.0 * math.pi) / beta


def matched_beta(stdev):
    """The β whose matched SmoothGrad σ is ``stdev`` (the relation is its own inverse)."""
    return matched_stdev(stdev)


def defence_methods(attributors=("all",), betas=DEFAULT_BETAS, finetuned=DEFAULT_FINETUNED,
                    samples=SMOOTHGRAD_SAMPLES):
    """Each attributor without defence, at every β and fine-tuned; then matched SmoothGrad."""
    specs = [None] + [defences.BetaSmoothing(beta).spec
                      for beta in defences.positive_numbers(betas, "betas", allow_empty=True)]
    if finetuned:
        specs.append(defences.FineTuned(finetuned).spec)
    methods = [GridMethod(name, spec) for name in resolve_attributors(attributors)
               for spec in specs]
    methods += [GridMethod(SMOOTHGRAD, None, {"samples": int(samples),
                                              "stdev": round(matched_stdev(beta), 6)})
                for beta in defences.positive_numbers(betas, "betas", allow_empty=True)]
    return methods


def runnable(methods, model_spec):
    """``(methods that can run on the model, {label: why not})``: an attributor that cannot
    explain the defended model (e.g. PatternAttribution has no patterns for fine-tuned
    weights) is left out with the reason, instead of stopping the grid half-way."""
    name, weights = parse_model(model_spec)
    model = models.load(name, weights)
    kept, skipped = [], {}
    for method in methods:
        try:
            create(method.attributor, defences.apply(method.defence, model), **method.options)
        except ManipBenchError as error:
            skipped[method.label()] = str(error)
        else:
            kept.append(method)
    return kept, skipped


def make_defence_grid(attributors=("all",), betas=DEFAULT_BETAS, finetuned=DEFAULT_FINETUNED,
                      model="cifar_vgg", pairs=BUNDLED, n=20, seed=0, preset="auto",
                      samples=SMOOTHGRAD_SAMPLES, **overrides):
    """A :class:`~.grid.Grid` (kind ``defend``) for one model; cells that cannot run are
    listed in ``grid.skipped`` (``{label: reason}``)."""
    if isinstance(model, str):
        model = [spec for spec in model.split(",") if spec.strip()]
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ManipBenchError("the defence table is made for one model at a time")
        model = model[0].strip()
    methods, skipped = runnable(defence_methods(attributors, betas, finetuned, samples), model)
    grid = build_grid(methods, [model], pairs, n, seed, preset, overrides, "defend")
    grid.skipped = skipped
    return grid


__all__ = ["DEFAULT_BETAS", "DEFAULT_FINETUNED", "SMOOTHGRAD", "defence_methods",
           "make_defence_grid", "matched_beta", "matched_stdev", "runnable"]
