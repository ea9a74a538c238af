"""How manipulable are an existing pipeline's explanations? One call: recognise, attack, report.

:func:`check_robustness` takes what a user already has -- a Captum attribution object, a
Zennit composite plus the model, or a registry name plus the model -- recognises the method
and its settings (:mod:`.recognise`), maps it onto the matching differentiable adapter of
:mod:`manip_bench.attributors`, runs the manipulation attack
(:class:`~manip_bench.attack.ManipulationAttack`, its default budget-tied schedule) on
every input within a budget, L-inf 8/255 by default (:mod:`.check`) and reports the result (:mod:`.report`); :mod:`.quantus` offers the same as
a Quantus-style metric. This is a worst case, not the random-noise sensitivity of Captum's
``sensitivity_max`` or Quantus' ``MaxSensitivity``.

The score
---------
For each assessed input ``i`` the attack returns ``x_adv_i`` inside the budget (by default
``|x_adv_i - x_i|_inf <= 8/255``) with pixels in [0, 1]. Its per-sample manipulability is::

    s_i = min(max(PCC(h(x_adv_i), t_i), 0), 1)   if top-1 class of x_adv_i == top-1 class of x_i
    s_i = 0                                       otherwise (also when the PCC is undefined)

with ``h`` the heatmap (sum over channels of |relevance|, normalised to sum 1) computed
exactly as the user's method computes it on the network the user explains (the ReLU
network; the Softplus(beta) network for the beta-smoothed variant), ``t_i`` the target map
and PCC the Pearson correlation over pixels. ``score = median_i s_i``: 0 means the
explanations could not be moved toward the targets, 1 means an imperceptible perturbation
makes every explanation look like an arbitrary other one while the prediction is kept.
The PCC the target had *before* the attack is reported next to it (``target_pcc_before``).
"""
from .check import DEFAULT_ITERATIONS, DEFAULT_LINF, check_folder, check_robustness, manipulability
from .quantus import ManipulationRobustness
from .recognise import SUPPORTED_CAPTUM, SUPPORTED_ZENNIT  # noqa: F401 - reachable here
from .recognise import RecognisedMethod, recognise
from .report import RobustnessReport

__all__ = ["DEFAULT_ITERATIONS", "DEFAULT_LINF", "ManipulationRobustness", "RecognisedMethod",
           "RobustnessReport", "check_folder", "check_robustness", "manipulability", "recognise"]
