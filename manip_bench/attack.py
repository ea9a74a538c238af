"""The manipulation attack (Dombrowski et al. 2019): one engine for every attributor.

Minimises over ``x_adv``, inside a threat model (:mod:`manip_bench.threat`: an L-inf or
L2 ball around ``x`` intersected with [0, 1], or unbounded), the sum of its losses
(:mod:`manip_bench.losses`), by default the paper's::

    L = w_expl * MSE(h(x_adv), h_target) + w_out * MSE(g(x_adv), g(x))

with ``h`` the heatmap of the attributor's relevance and ``g`` the network output.
Steps come from a schedule (:mod:`manip_bench.schedule`): by default one tied to the
budget that tunes itself; the paper's fixed-rate Adam with ``preset="paper"``.
Gradient-type attributors run on the Softplus(beta) network with beta grown from 10 to
100, unless the model computes softplus already (the beta-smoothing defence,
:mod:`manip_bench.defences`); the result is always judged on the network the user
explains, and the best image so far is returned.
"""
import dataclasses
import math
import time
import warnings

import torch

from . import attributors, heatmaps, losses, metrics
from . import schedule as schedules
from .defaults import DEFAULT_PRESET
from .errors import ManipBenchError
from .progress import reporter
from .threat import DEFAULT_BUDGET, Budget

#: |total relevance / target logit| above this is reported as far off. Biases and ε absorb
#: relevance, so ratios well below 1 are normal (0.0-0.4 on the bundled models); relevance
#: multiplied at unsupported additions gives ratios of 10-500 (measured, issue 16).
CONSERVATION_LIMIT = 5.0
#: what shortens an attack, for the warning after a slow first iteration
SHORTEN = ("fewer iterations shorten it (iterations=N in Python, --iterations N on the "
           "command line)")

#: The paper's learning rates are Adam steps in the normalised input space (std ~ 0.25);
#: this engine steps in [0, 1] pixel space, where the same move is lr * 0.25.
PIXEL_SCALE = 0.25

_PAPER = dict(schedule="adam", budget="none", weight_expl=1e11, weight_output=1e6)
#: ``auto`` plus the paper's hyper-parameters (Table 1: VGG-16 / ImageNet; Table 3:
#: CIFAR-10), which attack without a budget unless one is given.
PRESETS = {
    "auto": dict(schedule="auto", iterations=500, budget=DEFAULT_BUDGET, weight_output=1.0),
    "gradient": dict(_PAPER, iterations=1500, lr=1e-3 * PIXEL_SCALE),
    "integrated_gradients": dict(_PAPER, iterations=500, lr=5e-3 * PIXEL_SCALE),
    "lrp": dict(_PAPER, iterations=1500, lr=2e-4 * PIXEL_SCALE),
    "cifar10": dict(_PAPER, iterations=1500, lr=2e-4 * PIXEL_SCALE, weight_expl=1e7,
                    weight_output=1e2),
}


@dataclasses.dataclass
class AttackConfig:
    """Every knob of the attack; presets fill some, the user may override any.

    ``weight_expl=None`` weighs the explanation loss by its ``relative_weight`` times
    ``weight_output`` (for ``target_map``: the paper's ratio 1e5).
    """

    iterations: int = 500
    schedule: str = "auto"
    lr: float = None
    initial_step: float = None
    budget: Budget = DEFAULT_BUDGET
    loss: str = "target_map"
    weight_expl: float = None
    weight_output: float = 1.0
    weight_relevance: float = 0.0
    output: str = "softmax"
    beta_start: float = 10.0
    beta_end: float = 100.0
    preserve_total_relevance: bool = False
    eval_every: int = 10
    patience: int = None

    def check(self):
        """Normalise the budget and raise ManipBenchError for values that cannot work."""
        self.budget = Budget.parse(self.budget)
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ManipBenchError(
                f"iterations must be a whole number >= 1, got {self.iterations!r}")
        if self.schedule not in schedules.SCHEDULES:
            raise ManipBenchError(f"unknown schedule {self.schedule!r}; use "
                                  f"{' or '.join(schedules.SCHEDULES)}")
        if self.schedule == "adam" and not (self.lr is not None and self.lr > 0):
            raise ManipBenchError("the adam schedule needs a positive lr")
        if self.schedule == "auto" and self.lr is not None:
            raise ManipBenchError("lr sets the paper's fixed-rate Adam (preset 'paper' or "
                                  "schedule 'adam'); the auto schedule ties its steps to the "
                                  "budget (initial_step: a fraction of it)")
        if self.output not in ("softmax", "logits"):
            raise ManipBenchError(f"output must be 'softmax' or 'logits', got {self.output!r}")
        if min(self.beta_start, self.beta_end) <= 0:
            raise ManipBenchError("beta_start and beta_end must be positive")
        if not losses.get_class(self.loss).explanation:
            raise ManipBenchError(f"{self.loss!r} is a constraint, not an attack objective; "
                                  f"use one of {', '.join(losses.available(True))}")

    def build_losses(self):
        """The loss objects this configuration adds up (explanation, output, relevance)."""
        cls = losses.get_class(self.loss)
        weight = self.weight_expl if self.weight_expl is not None else \
            cls.relative_weight * self.weight_output
        parts = [losses.create(self.loss, weight=weight),
                 losses.OutputPreservation(self.weight_output, self.output)]
        if self.weight_relevance:
            parts.append(losses.TotalRelevance(self.weight_relevance))
        return parts

    def make_schedule(self):
        """A fresh step rule for one run."""
        return schedules.create(self.schedule, lr=self.lr, initial_step=self.initial_step)

    def to_json(self):
        return {**dataclasses.asdict(self), "budget": self.budget.to_json()}


def make_config(preset=DEFAULT_PRESET, **overrides):
    """An :class:`AttackConfig` from a preset name plus overrides (``None`` values ignored).

    ``linf=eps`` is shorthand for ``budget="linf:eps"``.
    """
    if preset not in PRESETS:
        raise ManipBenchError(f"unknown preset {preset!r}; available: paper, {', '.join(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "linf" in overrides:
        if "budget" in overrides:
            raise ManipBenchError("give either budget or linf, not both")
        overrides["budget"] = Budget("linf", overrides.pop("linf"))
    fields = {f.name for f in dataclasses.fields(AttackConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ManipBenchError(f"unknown attack option(s) {', '.join(unknown)}; "
                              f"available: {', '.join(sorted(fields | {'linf'}))}")
    values = {**PRESETS[preset], **overrides}
    if values.get("loss", "target_map") != "target_map" and "weight_expl" not in overrides:
        values.pop("weight_expl", None)  # the presets' weights are for the target-map loss
    config = AttackConfig(**values)
    config.check()
    return config


@dataclasses.dataclass
class AttackResult:
    """What an attack returns: the manipulated images, maps, per-sample metrics and history.

    ``target_map`` is ``None`` for an untargeted attack; ``budget``, ``losses`` and
    ``schedule`` say how the result was made (plain data, as written to results files).
    """

    attributor: str
    x: torch.Tensor
    x_adv: torch.Tensor
    target_map: torch.Tensor
    original_map: torch.Tensor
    adversarial_map: torch.Tensor
    original_class: torch.Tensor
    metrics: dict
    history: dict
    config: AttackConfig
    iterations: int
    seconds: float
    budget: Budget = None
    losses: list = None
    schedule: dict = None

    def summary(self):
        """Median of every metric over the batch (``class_kept``: the fraction kept)."""
        return metrics.summarize(self.metrics)

    def describe(self):
        """``budget``, ``losses`` and ``schedule`` as plain data (for results files)."""
        return {"budget": self.budget.to_json(), "losses": self.losses, "schedule": self.schedule}


@dataclasses.dataclass
class AttackState:
    """One attack run between steps (:meth:`ManipulationAttack.start` makes it).

    ``best_x`` / ``best_loss``: per image, the lowest loss seen with the class kept,
    judged on the network the user explains.
    """

    x: torch.Tensor
    x_adv: torch.Tensor
    schedule: object
    original_class: torch.Tensor
    reference: losses.Reference
    best_x: torch.Tensor
    best_loss: torch.Tensor
    step: int = 0
    last_improvement: int = 0


@dataclasses.dataclass
class StepResult:
    """What :meth:`ManipulationAttack.step` saw: ``x`` (before the update), its output and loss."""

    x: torch.Tensor
    output: torch.Tensor
    loss: torch.Tensor
    terms: dict
    beta: float


class ManipulationAttack:
    """Manipulation of an explanation (targeted or not), for any registry attributor.

    Parameters
    ----------
    model : torch.nn.Module
        Takes images in [0, 1]; never modified (attributors work on a copy). For a
        defended model pass it defended (``manip_bench.defences.beta_smooth(model, 2)``).
    attributor : str or Attributor
        A registry name (``manip_bench.attributors.available()``) or an attributor instance.
    preset : str
        ``"auto"`` (default: budget-tied self-tuning steps, L-inf 8/255), ``"paper"`` (the
        attributor's own preset from the paper: fixed-rate Adam, no budget unless given),
        or a key of :data:`PRESETS`.
    attributor_options : dict, optional
        Options for ``attributors.create`` (e.g. ``{"steps": 30}``).
    losses : list of manip_bench.losses.Loss, optional
        Replace the configured losses (``loss``, the weights) with your own objects.
    progress : None, bool, callable or rich.progress.Progress
        How each call reports its steps. ``None`` (default): a rich bar when standard error
        is a terminal (an interactive session), nothing otherwise (scripts writing to a
        pipe or log, pytest); ``True``: always a bar; ``False``: never; a callable
        ``progress(step, total, stats)`` is called after every step (``stats``:
        ``{"loss": ...}``); a running ``rich.progress.Progress`` gets a task for the call.
        rich is imported only when a bar is drawn (see :mod:`manip_bench.progress`).
    **overrides
        Any :class:`AttackConfig` field (``budget="8/255"``, ``iterations``, ``loss``...).
    """

    def __init__(self, model, attributor, preset=DEFAULT_PRESET,
                 attributor_options=None, losses=None, progress=None, **overrides):
        if isinstance(attributor, attributors.Attributor):
            self.explain = attributor
        else:
            cls = attributors.get_class(attributor)
            self._check_attackable(cls)
            self.explain = attributors.create(attributor, model, **(attributor_options or {}))
        self._check_attackable(self.explain)
        self.name = self.explain.name
        if preset == "paper":
            preset = self.explain.preset
        self.preset = preset
        self.config = make_config(preset, **overrides)
        self.budget = self.config.budget
        self.losses = list(losses) if losses is not None else self.config.build_losses()
        self._check_losses()
        #: attack through the softplus surrogate with a growing beta (a ReLU network's
        #: gradient-type map has no derivative to follow; a smoothed model needs none, and
        #: a network found smooth at the first step -- GELU, SiLU -- neither)
        self.grows_beta = self.explain.needs_softplus and not self.explain.smoothed
        self.progress = progress

    @staticmethod
    def _check_attackable(attributor):
        if not attributor.attackable:
            raise ManipBenchError(f"{attributor.name} cannot be attacked: "
                                  f"{attributor.not_attackable_reason}")

    def _check_losses(self):
        if not self.losses or not all(isinstance(loss, losses.Loss) for loss in self.losses):
            raise ManipBenchError("losses must be a non-empty list of manip_bench.losses.Loss")
        if not any(loss.explanation for loss in self.losses):
            raise ManipBenchError(f"no loss moves the explanation; add one of "
                                  f"{', '.join(losses.available(True))}")

    @property
    def targeted(self):
        """Whether a loss steers toward a target map (which the attack then needs)."""
        return any(loss.needs_target for loss in self.losses)

    def beta(self, step):
        """Surrogate softplus beta at ``step``: geometric growth beta_start -> beta_end
        (None: the explained network itself is attacked)."""
        if not self.grows_beta:
            return None
        c = self.config
        return c.beta_start * (c.beta_end / c.beta_start) ** (step / c.iterations)

    def heatmap(self, relevance):
        return heatmaps.heatmap(relevance, signed=self.config.preserve_total_relevance)

    def evaluate(self, x, target_class=None):
        """Output, relevance and heatmap on the network the user explains (no double backprop)."""
        self.explain.set_beta(None)
        if target_class is None:
            with torch.no_grad():
                target_class = self.explain.model(x).argmax(1)
        output, relevance = self.explain(x.detach(), target_class)
        return output.detach(), relevance.detach(), self.heatmap(relevance.detach())

    def target_maps(self, x_target):
        """Heatmaps of ``x_target`` for each image's own top-1 class (the paper's target maps)."""
        return self.evaluate(self._images(x_target))[2]

    def _images(self, x):
        """``x`` checked: (N, C, H, W), finite, in [0, 1], on the model's device and dtype."""
        if isinstance(x, torch.Tensor) and x.device != self.explain.device:
            x = x.to(self.explain.device)
        self.explain.check_images(x)
        if x.min() < 0 or x.max() > 1:
            raise ManipBenchError("images must be in [0, 1] (the models normalise inside)")
        self.explain.num_classes(x)  # a wrong size: one clear error, once per image shape
        return x.detach()

    def _terms(self, output, relevance, reference):
        """Per-sample weighted loss terms, by loss name."""
        current = losses.Explanation(output, relevance, self.heatmap(relevance))
        return {loss.name: loss(current, reference) for loss in self.losses}

    def _judge(self, x_adv, state):
        """Loss on the user's network, and whether the class is kept."""
        output, relevance, _ = self.evaluate(x_adv, state.original_class)
        loss = sum(self._terms(output, relevance, state.reference).values())
        return loss, output.argmax(1) == state.original_class

    def _keep_best(self, state, x_adv, loss, kept):
        """Copy images whose loss improved with the class kept into ``state.best_x``."""
        with torch.no_grad():
            better = kept & (loss.detach() < state.best_loss)
            if better.any():
                state.best_loss[better] = loss.detach()[better]
                state.best_x[better] = x_adv.detach()[better]
                state.last_improvement = state.step

    def _reference(self, x, target_map):
        output, relevance, original_map = self.evaluate(x)
        target = None
        if self.targeted:
            if target_map is None:
                untargeted = [n for n in losses.available(True)
                              if not losses.get_class(n).needs_target]
                raise ManipBenchError("this attack steers toward a target map: pass target_map, "
                                      f"or use an untargeted loss ({', '.join(untargeted)})")
            target = heatmaps.prepare_target(target_map.to(x.device), x.shape[0], x.shape[2:])
            if self.config.preserve_total_relevance:
                target = heatmaps.rescale_total(target, original_map)
        elif target_map is not None:
            raise ManipBenchError(f"the losses {', '.join(l.name for l in self.losses)} are "
                                  f"untargeted: they take no target map (pass target_map=None)")
        return losses.Reference(output, relevance, original_map, target)

    def start(self, x, target_map=None):
        """Set up an attack of images ``x`` (N, 3, H, W) in [0, 1], toward ``target_map`` (N, H, W).

        Returns the :class:`AttackState` that :meth:`step` advances; :meth:`__call__` is
        ``start``, ``iterations`` steps, and the final judging of the best images.
        """
        x = self._images(x)
        self.budget.check_image_size(x)
        reference = self._reference(x, target_map)
        x_adv = x.clone().requires_grad_()
        steps = self.config.make_schedule()
        steps.start(x_adv, self.budget, self.config.iterations)
        state = AttackState(x=x, x_adv=x_adv, schedule=steps,
                            original_class=reference.output.argmax(1), reference=reference,
                            best_x=x.clone(), best_loss=None)
        state.best_loss = self._judge(x, state)[0]
        return state

    def step(self, state):
        """One iteration: explain ``x_adv`` (at this step's beta), loss, step, projection.

        Keeps the best image so far in ``state`` and lets the schedule adapt. Returns a
        :class:`StepResult` for ``x_adv`` as it was before the update.
        """
        beta = self.beta(state.step)
        self.explain.set_beta(beta)
        x_adv = state.x_adv
        output, relevance = self.explain(x_adv, state.original_class)
        terms = self._terms(output, relevance, state.reference)
        loss = sum(terms.values())
        if state.step == 0:
            self._check_derivative(terms, x_adv)
            if self.grows_beta and not self.explain.swaps_activations:
                self.grows_beta = False  # smooth already (GELU, SiLU): attack it as it is
                beta = None
        (gradient,) = torch.autograd.grad(loss.sum(), x_adv)
        x_before = x_adv.detach().clone()
        if not self.grows_beta:  # the attacked network is the judged one
            self._keep_best(state, x_before, loss, output.argmax(1) == state.original_class)
        state.schedule.update(x_adv, gradient, loss)
        self.budget.project(x_adv, state.x)
        state.step += 1
        if self.grows_beta and (state.step % self.config.eval_every == 0
                                or state.schedule.is_checkpoint(state.step)):
            self._keep_best(state, x_adv, *self._judge(x_adv, state))
        state.schedule.checkpoint(state.step, x_adv, state.best_x, state.best_loss)
        return StepResult(x=x_before, output=output.detach(), loss=loss.detach(),
                          terms={key: value.detach() for key, value in terms.items()}, beta=beta)

    def __call__(self, x, target_map=None):
        """Attack images ``x`` (N, 3, H, W) in [0, 1] (toward ``target_map`` (N, H, W))."""
        start = time.perf_counter()
        c = self.config
        state = self.start(x, target_map)
        history = {"loss": [], "beta": [], **{loss.name: [] for loss in self.losses}}
        with reporter(self.progress, self.name, c.iterations, shorten=SHORTEN) as advance:
            try:
                while state.step < c.iterations:
                    result = self.step(state)
                    _record(history, result)
                    advance(loss=history["loss"][-1])
                    if c.patience is not None and \
                            state.step - 1 - state.last_improvement >= c.patience:
                        break
            finally:
                self.explain.set_beta(None)
        self._keep_best(state, state.x_adv, *self._judge(state.x_adv, state))
        return self._result(state, history, time.perf_counter() - start)

    def _result(self, state, history, seconds):
        reference, best_x = state.reference, state.best_x
        output_adv, relevance_adv, adversarial_map = self.evaluate(best_x, state.original_class)
        per_sample = {
            **metrics.prefixed("expl_original", metrics.map_similarity(adversarial_map,
                                                                       reference.heatmap)),
            **metrics.prefixed("input", metrics.image_similarity(best_x, state.x)),
            "input_budget_used": (self.budget.size(best_x - state.x) / self.budget.eps).tolist()
            if self.budget.bounded else [math.nan] * len(best_x),
            **metrics.output_similarity(output_adv, reference.output),
        }
        if getattr(self.explain, "conserving", False):
            per_sample["relevance_conservation"] = _conservation(
                self.name, output_adv, relevance_adv, state.original_class)
        if reference.target_map is not None:
            before = metrics.map_similarity(reference.heatmap, reference.target_map)["pcc"]
            per_sample = {**metrics.prefixed("expl_target", metrics.map_similarity(
                adversarial_map, reference.target_map)), "expl_target_pcc_before": before,
                **per_sample}
        return AttackResult(
            attributor=self.name, x=state.x, x_adv=best_x, target_map=reference.target_map,
            original_map=reference.heatmap, adversarial_map=adversarial_map,
            original_class=state.original_class, metrics=per_sample, history=history,
            config=self.config, iterations=state.step, seconds=seconds, budget=self.budget,
            losses=[loss.to_json() for loss in self.losses], schedule=state.schedule.to_json())

    def _check_derivative(self, terms, x_adv):
        moving = sum(value for loss, value in zip(self.losses, terms.values()) if loss.explanation)
        gradient = None
        if moving.requires_grad:  # a linear model's map is constant: no graph at all
            (gradient,) = torch.autograd.grad(moving.sum(), x_adv, retain_graph=True,
                                              allow_unused=True)
        if gradient is None or not gradient.abs().sum() > 0:
            raise ManipBenchError(
                f"{self.name}: the explanation has zero derivative in the input on this model, so "
                "it cannot be attacked (the network has no activation with curvature: neither a "
                "smooth one such as GELU nor a piecewise-linear one to swap, e.g. a linear model)")


def _conservation(name, output, relevance, target):
    """Total relevance / target logit per image; warns when it is far from 1."""
    logit = output.gather(1, target.view(-1, 1)).squeeze(1)
    ratio = (attributors.total_relevance(relevance) / logit).tolist()
    far = [r for r in ratio if not abs(r) <= CONSERVATION_LIMIT]
    if far:
        warnings.warn(f"{name}: total relevance is far from the target logit on {len(far)} of "
                      f"{len(ratio)} images (ratio {min(far):.3g}..{max(far):.3g}); the map may "
                      f"not be the LRP of this model (unsupported layers or additions?)",
                      RuntimeWarning, stacklevel=3)
    return ratio


def _record(history, result):
    history["loss"].append(result.loss.mean().item())
    for key, value in result.terms.items():
        history[key].append(value.mean().item())
    history["beta"].append(result.beta)
