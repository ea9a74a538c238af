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
``|x_adv_i - x_i|_inf <= 8/255``) with pixels in [0, 1], steering its heatmap ``h`` (sum
over channels of |relevance|, normalised to sum 1, computed exactly as the user's method
computes it on the network the user explains) toward a target map ``t_i``. Its per-sample
manipulability is the gain in target similarity over what was left to gain::

    before_i = PCC(h(x_i), t_i)      after_i = PCC(h(x_adv_i), t_i)
    s_i = clip((after_i - before_i) / (1 - before_i), 0, 1)   if the top-1 class is kept
    s_i = 0                                                    if it flipped
    s_i = NaN, "already similar"                               if before_i >= 0.9

``score`` is the median of ``s_i`` over the inputs that are not already similar (NaN when
none is left): 0 means the attack did not move the explanations toward the targets, 1 that
an imperceptible perturbation makes them match while the prediction is kept. The rule is
:mod:`manip_bench.manipulability`, shared with the benchmark report and its curves; the raw
``target_pcc_before`` and ``target_pcc`` are in every report.
"""
from .check import DEFAULT_ITERATIONS, DEFAULT_LINF, check_folder, check_robustness
from .quantus import ManipulationRobustness
from .recognise import SUPPORTED_CAPTUM, SUPPORTED_ZENNIT  # noqa: F401 - reachable here
from .recognise import RecognisedMethod, recognise
from .report import RobustnessReport

__all__ = ["DEFAULT_ITERATIONS", "DEFAULT_LINF", "ManipulationRobustness", "RecognisedMethod",
           "RobustnessReport", "check_folder", "check_robustness", "recognise"]
