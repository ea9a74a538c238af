"""The manipulation attack (Dombrowski et al. 2019): one engine for every attributor.

Minimises over ``x_adv`` (Adam in [0, 1] pixel space, clamped after every step)::

    L = w_expl * MSE(h(x_adv), h_target) + w_out * MSE(g(x_adv), g(x))
        [+ w_rel * (sum R(x_adv) - sum R(x))^2]

with ``h`` the heatmap of the attributor's relevance and ``g`` the network output.
Gradient-type attributors run on the Softplus(beta) network with beta grown from 10 to
100; the result is always judged on the network the user explains (ReLU, or the
beta-smoothed one for the defence).
"""
import contextlib
import dataclasses
import math
import time

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from . import attributors, heatmaps, metrics
from .errors import ManipBenchError

#: The paper's learning rates are Adam steps in the normalised input space (std ~ 0.25);
#: this engine steps in [0, 1] pixel space, where the same move is lr * 0.25.
PIXEL_SCALE = 0.25

#: The paper's hyper-parameters (Table 1: VGG-16 / ImageNet; Table 3: CIFAR-10).
PRESETS = {
    "gradient": dict(iterations=1500, lr=1e-3 * PIXEL_SCALE, weight_expl=1e11, weight_output=1e6),
    "integrated_gradients": dict(iterations=500, lr=5e-3 * PIXEL_SCALE, weight_expl=1e11,
                                 weight_output=1e6),
    "lrp": dict(iterations=1500, lr=2e-4 * PIXEL_SCALE, weight_expl=1e11, weight_output=1e6),
    "cifar10": dict(iterations=1500, lr=2e-4 * PIXEL_SCALE, weight_expl=1e7, weight_output=1e2),
}


@dataclasses.dataclass
class AttackConfig:
    """Every knob of the attack; presets fill some, the user may override any."""

    iterations: int = 1500
    lr: float = 2e-4 * PIXEL_SCALE
    weight_expl: float = 1e11
    weight_output: float = 1e6
    weight_relevance: float = 0.0
    output: str = "softmax"
    beta_start: float = 10.0
    beta_end: float = 100.0
    preserve_total_relevance: bool = False
    linf: float = None
    eval_every: int = 10
    patience: int = None

    def check(self):
        """Raise ManipBenchError for values that cannot work."""
        if self.iterations < 1:
            raise ManipBenchError("iterations must be at least 1")
        if not self.lr > 0:
            raise ManipBenchError("lr must be positive")
        if self.output not in ("softmax", "logits"):
            raise ManipBenchError(f"output must be 'softmax' or 'logits', got {self.output!r}")
        if self.linf is not None and not self.linf > 0:
            raise ManipBenchError("linf budget must be positive (pixel units, e.g. 8/255)")
        if min(self.beta_start, self.beta_end) <= 0:
            raise ManipBenchError("beta_start and beta_end must be positive")


def make_config(preset, **overrides):
    """An :class:`AttackConfig` from a preset name plus overrides (``None`` values ignored)."""
    if preset not in PRESETS:
        raise ManipBenchError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(AttackConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ManipBenchError(f"unknown attack option(s) {', '.join(unknown)}; "
                              f"available: {', '.join(sorted(fields))}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    config = AttackConfig(**values)
    config.check()
    return config


@dataclasses.dataclass
class AttackResult:
    """What an attack returns: the manipulated images, maps, per-sample metrics and history."""

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

    def summary(self):
        """Median of every metric over the batch (``class_kept``: the fraction kept)."""
        return metrics.summarize(self.metrics)


@dataclasses.dataclass
class AttackState:
    """One attack run between steps (:meth:`ManipulationAttack.start` makes it)."""

    x: torch.Tensor
    x_adv: torch.Tensor
    optimizer: torch.optim.Optimizer
    original_output: torch.Tensor
    original_map: torch.Tensor
    original_class: torch.Tensor
    #: (target map, reference output, total relevance of x): what the loss compares with
    reference: tuple
    step: int = 0


@dataclasses.dataclass
class StepResult:
    """What :meth:`ManipulationAttack.step` saw: ``x`` (before the update), its output and loss."""

    x: torch.Tensor
    output: torch.Tensor
    loss: torch.Tensor
    terms: dict
    beta: float


class ManipulationAttack:
    """Targeted manipulation of an explanation, for any registry attributor.

    Parameters
    ----------
    model : torch.nn.Module
        Takes images in [0, 1]; never modified (attributors work on a copy).
    attributor : str or Attributor
        A registry name (``manip_bench.attributors.available()``) or an attributor instance.
    preset : str
        ``"paper"`` (the attributor's own preset), or a key of :data:`PRESETS`.
    smooth_beta : float, optional
        Attack (and judge) the beta-smoothed explanation instead: the paper's defence.
    attributor_options : dict, optional
        Options for ``attributors.create`` (e.g. ``{"steps": 30}``).
    progress : bool or rich.progress.Progress
        Show a progress bar (or add a task to a running ``Progress``).
    **overrides
        Any :class:`AttackConfig` field.
    """

    def __init__(self, model, attributor, preset="paper", smooth_beta=None,
                 attributor_options=None, progress=False, **overrides):
        if isinstance(attributor, attributors.Attributor):
            self.explain = attributor
        else:
            cls = attributors.get_class(attributor)
            self._check_attackable(cls)
            self.explain = attributors.create(attributor, model, smooth_beta=smooth_beta,
                                              **(attributor_options or {}))
        self._check_attackable(self.explain)
        self.name = self.explain.name
        if preset == "paper":
            preset = self.explain.preset
        self.preset = preset
        self.config = make_config(preset, **overrides)
        self.eval_beta = self.explain.smooth_beta
        self.grows_beta = self.explain.needs_softplus and self.eval_beta is None
        self.progress = progress

    @staticmethod
    def _check_attackable(attributor):
        if not attributor.attackable:
            raise ManipBenchError(f"{attributor.name} cannot be attacked: "
                                  f"{attributor.not_attackable_reason}")

    def beta(self, step):
        """Softplus beta at ``step``: geometric growth beta_start -> beta_end, or fixed."""
        if not self.grows_beta:
            return self.eval_beta
        c = self.config
        return c.beta_start * (c.beta_end / c.beta_start) ** (step / c.iterations)

    def heatmap(self, relevance):
        return heatmaps.heatmap(relevance, signed=self.config.preserve_total_relevance)

    def _output(self, logits):
        return logits.softmax(1) if self.config.output == "softmax" else logits

    def evaluate(self, x, target_class=None):
        """Output, relevance and heatmap on the network the user explains (no double backprop)."""
        self.explain.set_beta(self.eval_beta)
        if target_class is None:
            with torch.no_grad():
                target_class = self.explain.model(x).argmax(1)
        output, relevance = self.explain(x.detach(), target_class)
        return output.detach(), relevance.detach(), self.heatmap(relevance.detach())

    def target_maps(self, x_target):
        """Heatmaps of ``x_target`` for each image's own top-1 class (the paper's target maps)."""
        return self.evaluate(_check_images(x_target, self.explain.device))[2]

    def _loss_terms(self, output, relevance, reference):
        """Per-sample loss terms (means over pixels / output entries)."""
        target_map, target_output, total = reference
        terms = {
            "expl": (self.heatmap(relevance) - target_map).square().flatten(1).mean(1),
            "output": (self._output(output) - target_output).square().mean(1),
        }
        if self.config.weight_relevance:
            terms["relevance"] = (attributors.total_relevance(relevance) - total).square()
        return terms

    def _weighted(self, terms):
        c = self.config
        weights = {"expl": c.weight_expl, "output": c.weight_output,
                   "relevance": c.weight_relevance}
        return sum(weights[key] * value for key, value in terms.items())

    def _judge(self, x_adv, original_class, reference):
        """Loss on the user's network, and whether the class is kept."""
        output, relevance, _ = self.evaluate(x_adv, original_class)
        loss = self._weighted(self._loss_terms(output, relevance, reference))
        return loss, output.argmax(1) == original_class

    def start(self, x, target_map):
        """Set up an attack of images ``x`` (N, 3, H, W) in [0, 1] toward ``target_map`` (N, H, W).

        Returns the :class:`AttackState` that :meth:`step` advances; :meth:`__call__` is
        ``start``, ``iterations`` steps with best-so-far bookkeeping, and the final judging.
        """
        x = _check_images(x, self.explain.device)
        original_output, relevance, original_map = self.evaluate(x)
        target = heatmaps.prepare_target(target_map.to(x.device), x.shape[0], x.shape[2:])
        if self.config.preserve_total_relevance:
            target = heatmaps.rescale_total(target, original_map)
        reference = (target, self._output(original_output), attributors.total_relevance(relevance))
        x_adv = x.clone().requires_grad_()
        return AttackState(x=x, x_adv=x_adv, optimizer=torch.optim.Adam([x_adv], lr=self.config.lr),
                           original_output=original_output, original_map=original_map,
                           original_class=original_output.argmax(1), reference=reference)

    def step(self, state):
        """One iteration: explain ``x_adv`` (at this step's beta), loss, Adam step, projection.

        Returns a :class:`StepResult` for ``x_adv`` as it was before the update.
        """
        c = self.config
        beta = self.beta(state.step)
        self.explain.set_beta(beta)
        x_adv = state.x_adv
        output, relevance = self.explain(x_adv, state.original_class)
        terms = self._loss_terms(output, relevance, state.reference)
        loss = self._weighted(terms)
        if state.step == 0:
            self._check_derivative(terms["expl"], x_adv)
        x_before = x_adv.detach().clone()
        state.optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        state.optimizer.step()
        with torch.no_grad():
            if c.linf is not None:
                x_adv.copy_(torch.minimum(torch.maximum(x_adv, state.x - c.linf), state.x + c.linf))
            x_adv.clamp_(0, 1)
        state.step += 1
        return StepResult(x=x_before, output=output.detach(), loss=loss.detach(),
                          terms={key: value.detach() for key, value in terms.items()}, beta=beta)

    def __call__(self, x, target_map):
        """Attack images ``x`` (N, 3, H, W) in [0, 1] toward ``target_map`` (N, H, W)."""
        start = time.perf_counter()
        c = self.config
        state = self.start(x, target_map)
        x, original_class, reference = state.x, state.original_class, state.reference
        best_x = x.clone()
        best_loss, _ = self._judge(x, original_class, reference)
        history = {"loss": [], "expl": [], "output": [], "relevance": [], "beta": []}
        last_improvement = 0
        with _progress_bar(self.progress, self.name, c.iterations) as advance:
            try:
                while state.step < c.iterations:
                    result = self.step(state)
                    step = state.step - 1
                    if not self.grows_beta:  # the attacked network is the judged one
                        kept = result.output.argmax(1) == original_class
                        last_improvement = _keep_best(best_x, best_loss, result.x, result.loss,
                                                      kept, step, last_improvement)
                    elif state.step % c.eval_every == 0:
                        judged, kept = self._judge(state.x_adv, original_class, reference)
                        last_improvement = _keep_best(best_x, best_loss, state.x_adv, judged, kept,
                                                      step, last_improvement)
                    _record(history, result)
                    advance(loss=history["loss"][-1], expl=history["expl"][-1])
                    if c.patience is not None and step - last_improvement >= c.patience:
                        break
            finally:
                self.explain.set_beta(self.eval_beta)
        judged, kept = self._judge(state.x_adv, original_class, reference)
        _keep_best(best_x, best_loss, state.x_adv, judged, kept, state.step, last_improvement)

        output_adv, _, adversarial_map = self.evaluate(best_x, original_class)
        target, original_map, original_output = reference[0], state.original_map, state.original_output
        per_sample = {
            **metrics.prefixed("expl_target", metrics.map_similarity(adversarial_map, target)),
            **metrics.prefixed("expl_original", metrics.map_similarity(adversarial_map, original_map)),
            **metrics.prefixed("input", metrics.image_similarity(best_x, x)),
            **metrics.output_similarity(output_adv, original_output),
        }
        return AttackResult(
            attributor=self.name, x=x, x_adv=best_x, target_map=target, original_map=original_map,
            adversarial_map=adversarial_map, original_class=original_class, metrics=per_sample,
            history=history, config=c, iterations=state.step,
            seconds=time.perf_counter() - start)

    def _check_derivative(self, expl_terms, x_adv):
        (gradient,) = torch.autograd.grad(expl_terms.sum(), x_adv, retain_graph=True,
                                          allow_unused=True)
        if gradient is None or not gradient.abs().sum() > 0:
            raise ManipBenchError(
                f"{self.name}: the explanation has zero derivative in the input on this model, so "
                "it cannot be attacked (functional F.relu calls cannot be swapped for softplus; "
                "use nn.ReLU modules)")


def _keep_best(best_x, best_loss, x_adv, loss, kept, step, last_improvement):
    """Copy samples whose loss improved with the class kept into ``best_x`` (in place)."""
    with torch.no_grad():
        better = kept & (loss.detach() < best_loss)
        if better.any():
            best_loss[better] = loss.detach()[better]
            best_x[better] = x_adv.detach()[better]
            return step
    return last_improvement


def _record(history, result):
    history["loss"].append(result.loss.mean().item())
    for key in ("expl", "output", "relevance"):
        value = result.terms.get(key)
        history[key].append(value.mean().item() if value is not None else 0.0)
    history["beta"].append(result.beta)


def _check_images(x, device):
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ManipBenchError("images must be a float tensor of shape (N, C, H, W)")
    if x.min() < 0 or x.max() > 1:
        raise ManipBenchError("images must be in [0, 1] (the models normalise inside)")
    return x.detach().to(device)


@contextlib.contextmanager
def _progress_bar(progress, name, total):
    """Yield ``advance(**stats)``; draws a rich bar if asked (own, or a task in a given Progress)."""
    if not progress:
        yield lambda **stats: None
        return
    own = not isinstance(progress, Progress)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.3g}  expl {task.fields[expl]:.3g}"),
                   TimeRemainingColumn(), transient=False) if own else progress
    task = bar.add_task(name, total=total, loss=math.nan, expl=math.nan)
    with (bar if own else contextlib.nullcontext()):
        try:
            yield lambda **stats: bar.update(task, advance=1, **stats)
        finally:
            if not own:
                bar.remove_task(task)
