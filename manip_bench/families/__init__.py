"""Model families for the transformer LRP attributors: which module gets which LRP role.

A family knows one architecture's forward (:mod:`.torchvision_vit`,
:mod:`.torchvision_swin`, :mod:`.timm_vit`) and replays it
operation by operation on a *tape* (:class:`manip_bench.attributors.transformer_lrp.Tape`),
naming each operation's role ("linear", "norm", "activation", "softmax", "scores",
"context", "structure"); the attributor decides the rule of each role. Modules inside a
block are mapped by the table in :mod:`.modules`, attention by :func:`.modules.attention`.
"""
from ..errors import ManipBenchError
from . import timm_vit, torchvision_swin, torchvision_vit

#: every known family, tried in order
FAMILIES = (torchvision_vit, torchvision_swin, timm_vit)


def find(model):
    """The family of ``model`` (a module with ``matches``, ``probe`` and ``forward``)."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    raise ManipBenchError(
        f"no transformer family table for a {type(model).__name__}; the transformer LRP "
        f"attributors explain: {', '.join(family.DESCRIPTION for family in FAMILIES)}")
