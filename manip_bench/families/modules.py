"""The table of modules a transformer block may hold, and attention written out.

Each known module type has a role (its rule is the attributor's choice); dropout and
identity modules compute nothing in eval mode and are skipped. Attention is written as
explicit operations (projections, q·kᵀ, softmax, A·v, output projection): AttnLRP has a
rule for each, and PyTorch's fused attention has no double backward on CPU.
"""
from torch import nn
from torch.nn import functional as F

#: element-wise non-linearities with f(0) = 0 (AttnLRP's identity rule divides by x)
ELEMENTWISE = (nn.GELU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Mish, nn.Tanh,
               nn.Hardswish)
#: modules that return their input in eval mode
SKIPPED = (nn.Dropout, nn.Identity)
#: modules that only move or average values (their plain gradient is LRP-0)
STRUCTURE = (nn.Flatten, nn.AdaptiveAvgPool2d, nn.AvgPool2d)
#: module type -> role
ROLES = ((nn.Linear, "linear"), (nn.Conv2d, "linear"), (nn.LayerNorm, "norm"),
         (ELEMENTWISE, "activation"), (STRUCTURE, "structure"))


def role_of(module):
    """The role of ``module`` in the table, or None."""
    return next((role for types, role in ROLES if isinstance(module, types)), None)


def run(tape, module, x):
    """``module(x)`` recorded on ``tape``: a table module, a Sequential of them, or a module
    that hands back its input unchanged in eval mode (timm's DropPath, PatchDropout)."""
    if isinstance(module, SKIPPED):
        return x
    if isinstance(module, nn.Sequential):
        for child in module:
            x = run(tape, child, x)
        return x
    role = role_of(module)
    if role is None:
        if module(x) is x:
            return x
        raise tape.refuse(module, "it has no LRP rule in the transformer module table "
                                  "(Linear, Conv2d, LayerNorm, element-wise activations, "
                                  "Dropout, Identity, Sequential of them)")
    if role == "norm" and len(module.normalized_shape) != 1:
        raise tape.refuse(module, "only LayerNorm over the last dimension is supported")
    return tape.apply(role, module, x, module=module)


def attention(tape, x, in_weight, in_bias, heads, out_proj, q_norm=None, k_norm=None,
              out_norm=None, score_bias=None):
    """Self-attention of ``x`` (N, S, E): q, k, v = x Wᵀ + b (``in_weight`` stacks the three
    projections, each ``heads * head_dim`` rows), softmax(q kᵀ / √d + bias) v per head, then
    ``out_norm`` and ``out_proj``. ``q_norm``/``k_norm`` act per head on q and k;
    ``score_bias(scores)`` adds constants to the scores (relative position bias, masks)."""
    width = in_weight.shape[0] // 3
    head_dim = width // heads

    def project(i, norm):
        weight = in_weight[i * width:(i + 1) * width]
        bias = None if in_bias is None else in_bias[i * width:(i + 1) * width]
        linear = tape.apply("linear", lambda t: F.linear(t, weight, bias), x)
        split = tape.apply("structure", lambda t: t.unflatten(-1, (heads, head_dim))
                           .transpose(-3, -2), linear)
        return split if norm is None else run(tape, norm, split)

    q, k, v = project(0, q_norm), project(1, k_norm), project(2, None)
    q = tape.apply("structure", lambda t: t * head_dim ** -0.5, q)
    scores = tape.apply("scores", lambda a, b: a @ b.transpose(-2, -1), q, k)
    if score_bias is not None:
        scores = tape.apply("structure", score_bias, scores)
    weights = tape.apply("softmax", lambda s: s.softmax(-1), scores)
    context = tape.apply("context", lambda a, b: a @ b, weights, v)
    merged = tape.apply("structure", lambda t: t.transpose(-3, -2).flatten(-2), context)
    if out_norm is not None:
        merged = run(tape, out_norm, merged)
    return run(tape, out_proj, merged)
