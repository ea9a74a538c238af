"""AttnLRP and CP-LRP for Vision Transformers, differentiable in the input.

AttnLRP (Achtibat et al., ICML 2024) extends LRP to attention: ε on linear layers, the
identity rule on LayerNorm's normalisation and on element-wise non-linearities, a rule
of its own for the softmax, and the uniform rule on the two bilinear products of
attention (q·kᵀ and A·v). CP-LRP (Ali et al., ICML 2022) treats the attention weights A
as constants instead, so all relevance of A·v goes to v.

The relevance is computed in the gradient x input form: a *modified gradient* ``g`` is
propagated from the target logit back to the image, one recorded operation at a time,
and the relevance of any tensor ``t`` on the way is ``t * g``. Each rule is a small
object mapping the modified gradient of an operation's output to those of its inputs.
Unlike lxt's efficient form (autograd through a forward patched with ``detach`` and
custom autograd Functions), every rule here is written with differentiable torch
operations on the forward's own tensors: LayerNorm's standard deviation is a constant
of the *rule* but stays a function of ``x`` in the graph, so the derivative of the
relevance in ``x`` is the derivative of AttnLRP's relevance (double backpropagation).

Which module gets which rule is a table per model family (:mod:`manip_bench.families`);
the families walk the model's forward and record roles ("linear", "norm", ...), the
attributor maps roles to rules.
"""
import torch
from torch import nn

from .. import families
from ..errors import ManipBenchError
from .base import Attributor, input_with_grad, one_hot
from .canonize import input_affine_map


def stabilize(z, epsilon):
    """``z`` moved away from zero by ``epsilon`` in the direction of its sign (0 counts as +)."""
    return z + ((z == 0).to(z.dtype) + z.sign()) * epsilon


class Rule:
    """Maps the modified gradient of an operation's output to its inputs' (None: nothing)."""

    def backward(self, grad, op):
        """Modified gradients for ``op.inputs`` given ``grad`` for ``op.output``."""
        raise NotImplementedError

    def __repr__(self):
        facts = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({facts})"


def _vjp(op, grad, inputs=None):
    """Vector-Jacobian product of ``op`` (its own autograd graph), kept differentiable."""
    return torch.autograd.grad(op.output, op.inputs if inputs is None else inputs, grad,
                               create_graph=True)


class Gradient(Rule):
    """The plain gradient (LRP-0 in gradient x input form).

    Used for operations that only move, copy or add values (reshapes, concatenation with
    the class token, residual and position-embedding additions, constant scaling), and
    for AttnLRP's softmax rule: R_in = s_in * (R_out - p * sum(R_out)) with p the softmax
    output is input x gradient of the softmax itself.
    """

    def backward(self, grad, op):
        return _vjp(op, grad)


class Epsilon(Rule):
    """LRP-ε on a linear map z = W x + b: g_in = Wᵀ (g * z / (z + ε sign z)).

    ``epsilon=0`` is LRP-0 (the plain gradient).
    """

    def __init__(self, epsilon=1e-6):
        self.epsilon = epsilon

    def backward(self, grad, op):
        if self.epsilon:
            grad = grad * op.output / stabilize(op.output, self.epsilon)
        return _vjp(op, grad)


class LayerNormIdentity(Rule):
    """LayerNorm with its standard deviation held constant by the rule (identity rule).

    y = γ (x - mean x) / σ + β is then linear in x, and relevance passes the
    normalisation as through a linear layer without bias: g_in = center(γ g / σ).
    σ is recomputed from the forward's input and stays differentiable in x.
    """

    def backward(self, grad, op):
        (x,) = op.inputs
        module = op.module
        std = (x.var(-1, unbiased=False, keepdim=True) + module.eps).sqrt()
        scaled = grad * module.weight if module.weight is not None else grad
        scaled = scaled / std
        return (scaled - scaled.mean(-1, keepdim=True),)


def _gelu_secant(module, x):
    if module.approximate == "tanh":
        return 0.5 * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)))
    return 0.5 * (1 + torch.erf(x * 0.5 ** 0.5))


#: f(x) / x in closed form for element-wise f(x) = x * h(x): h(x), smooth through x = 0
SECANTS = {
    nn.GELU: _gelu_secant,
    nn.SiLU: lambda module, x: torch.sigmoid(x),
    nn.ReLU: lambda module, x: (x > 0).to(x.dtype),
}


class Identity(Rule):
    """Identity rule on an element-wise non-linearity y = f(x): R_in = R_out.

    In gradient form g_in = g * f(x) / x. For the activations of :data:`SECANTS` the ratio
    is computed in closed form (exact, and smooth where x is near 0); for others the
    division is stabilised by ``epsilon``.
    """

    def __init__(self, epsilon=1e-10):
        self.epsilon = epsilon

    def backward(self, grad, op):
        (x,) = op.inputs
        secant = SECANTS.get(type(op.module))
        if secant is not None:
            return (grad * secant(op.module, x),)
        return (grad * op.output / stabilize(x, self.epsilon),)


class Uniform(Rule):
    """Uniform rule on a product of two inputs (q·kᵀ, A·v): each gets a share of the relevance.

    ``shares=(0.5, 0.5)`` is AttnLRP's uniform rule; ``(0, 1)`` on A·v is CP-LRP (the
    attention weights A are constants, all relevance goes to v).
    """

    def __init__(self, shares=(0.5, 0.5)):
        self.shares = tuple(shares)

    def backward(self, grad, op):
        wanted = [i for i, share in enumerate(self.shares) if share]
        grads = _vjp(op, grad, [op.inputs[i] for i in wanted])
        result = [None] * len(op.inputs)
        for i, g in zip(wanted, grads):
            result[i] = self.shares[i] * g
        return tuple(result)


class Op:
    """One recorded operation: its rule, inputs, output and (optional) module.

    ``inputs`` are fresh aliases (views) of the ``sources`` tensors the operation was given:
    the output depends on an alias only through this operation, so a vector-Jacobian
    product with respect to ``inputs`` is the operation's own (a residual addition's
    gradient for its input excludes the path through the attention it added).
    """

    __slots__ = ("rule", "sources", "inputs", "output", "module")

    def __init__(self, rule, sources, inputs, output, module):
        self.rule, self.sources, self.inputs = rule, sources, inputs
        self.output, self.module = output, module


class Tape:
    """Records a model family's forward as operations with roles, then propagates relevance.

    Parameters
    ----------
    rules : dict
        role name -> :class:`Rule` ("linear", "norm", "activation", "softmax", "scores",
        "context", "structure").
    names : dict
        module -> its qualified name in the model (for errors).
    """

    def __init__(self, rules, names=None):
        self.rules, self.names, self.ops = rules, names or {}, []

    def apply(self, role, fn, *inputs, module=None):
        """``fn(*inputs)``, recorded with the rule for ``role``; ``inputs`` are the tensors
        relevance flows to (constants such as the class token stay inside ``fn``)."""
        aliases = tuple(tensor.view_as(tensor) for tensor in inputs)
        output = fn(*aliases)
        self.ops.append(Op(self.rules[role], inputs, aliases, output, module))
        return output

    def name(self, module):
        return self.names.get(module, type(module).__name__)

    def refuse(self, module, why):
        """A ManipBenchError naming ``module``."""
        return ManipBenchError(f"LRP for transformers cannot read module '{self.name(module)}' "
                               f"({type(module).__name__}): {why}")

    def relevance(self, x, output, grad):
        """Relevance of ``x`` for the modified gradient ``grad`` at ``output``: x * g_x."""
        grads = {id(output): grad}
        for op in reversed(self.ops):
            g = grads.pop(id(op.output), None)
            if g is None:
                continue
            for tensor, g_in in zip(op.sources, op.rule.backward(g, op)):
                if g_in is not None:
                    key = id(tensor)
                    grads[key] = grads[key] + g_in if key in grads else g_in
        g_x = grads.get(id(x))
        if g_x is None:
            raise ManipBenchError("LRP for transformers: no relevance reached the input; the "
                                  "model's forward does not use the image the way its family "
                                  "table says")
        return x * g_x


def attnlrp_rules(epsilon=1e-6):
    """AttnLRP's rule for every role."""
    return {"linear": Epsilon(epsilon), "norm": LayerNormIdentity(), "activation": Identity(),
            "softmax": Gradient(), "scores": Uniform(), "context": Uniform(),
            "structure": Gradient()}


class TransformerLRP(Attributor):
    """LRP for a Vision Transformer through a rule per role (:func:`attnlrp_rules`).

    ``epsilon`` is the ε of the linear layers (0: LRP-0). The model's family (which module
    gets which role) is found at creation (:func:`manip_bench.families.find`); models
    without a family table, and attention modules it cannot read, are refused.
    The relevance conserves the target logit where the rules do (see ``docs/transformer_lrp.md``
    for measured ratios: biases, the class token and the position embedding absorb
    relevance, and AttnLRP's softmax rule is not conservative).
    """

    library = "manip_bench"
    #: explains this architecture only (kept out of the "all" group, which CNN grids use)
    architecture = "vision transformer"
    preset = "lrp"
    conserving = True
    swap_relu = False

    def __init__(self, model, epsilon=1e-6):
        super().__init__(model)
        if not epsilon >= 0:
            raise ManipBenchError(f"epsilon must be >= 0, got {epsilon}")
        self.epsilon = epsilon
        self.family, self.transformer = _transformer_inside(self.model)
        self._names = {module: name for name, module in self.model.named_modules()}
        probe = self.family.probe(self.transformer)
        #: ``(slope, offset)`` of a normalisation the model applies before its transformer
        self.input_map = _input_map(self.model, self.transformer, probe, self._names)
        with torch.no_grad():  # a dry run: unreadable modules are refused at creation
            self.family.forward(self.transformer, probe, Tape(self.rules(), self._names))

    def rules(self):
        """Role -> rule for one explanation."""
        return attnlrp_rules(self.epsilon)

    def attribute(self, x, target):
        x = input_with_grad(x)
        with torch.enable_grad():
            # the relevance reaching the transformer's input passes a normalisation unchanged
            z = x if self.input_map is None else self.input_map[0] * x + self.input_map[1]
            tape = Tape(self.rules(), self._names)
            output = self.family.forward(self.transformer, z, tape)
            relevance = tape.relevance(z, output, one_hot(target, output))
        return output, relevance


def _transformer_inside(model):
    """``(family, module)``: the model itself if a family knows it, else its one submodule
    that a family knows (``nn.Sequential(normalize, vit)``, a wrapper module)."""
    try:
        return families.find(model), model
    except ManipBenchError as error:
        inner = [m for name, m in model.named_modules()
                 if name and any(f.matches(m) for f in families.FAMILIES)]
        if len(inner) != 1:
            raise error
        return families.find(inner[0]), inner[0]


def _input_map(model, transformer, probe, names):
    """``(slope, offset)`` of what ``model`` does before ``transformer`` (None: nothing), or a
    ManipBenchError when that is not an elementwise affine map or something follows it."""
    if transformer is model:
        return None
    name = names.get(transformer, "")
    affine = input_affine_map(model, transformer, probe)
    if affine is None:
        raise ManipBenchError(
            f"the model computes something before its transformer '{name}' that is not an "
            "elementwise affine normalisation; LRP for transformers explains a transformer "
            "alone or behind a normalisation (nn.Sequential(normalize, vit))")
    x = torch.rand(probe.shape, generator=torch.Generator().manual_seed(0),
                   dtype=probe.dtype).to(probe.device)
    with torch.no_grad():
        outer, inner = model(x), transformer(affine[0] * x + affine[1])
    if not torch.allclose(outer, inner, rtol=1e-4, atol=1e-5 * max(1.0, inner.abs().max())):
        raise ManipBenchError(f"the model's output is not its transformer '{name}''s output; "
                              "LRP for transformers explains a transformer's logits")
    return affine


class AttnLRP(TransformerLRP):
    """AttnLRP: ε linear, identity LayerNorm and GELU, softmax rule, uniform q·kᵀ and A·v."""

    name = "lrp.attnlrp"
    rule = "AttnLRP: ε linear, identity LayerNorm/GELU, softmax rule, uniform q·kᵀ, A·v"


class CPLRP(TransformerLRP):
    """CP-LRP: as AttnLRP outside attention; attention weights are constants (all to v)."""

    name = "lrp.cp_lrp"
    rule = "CP-LRP: attention weights constant; ε linear, identity LayerNorm/GELU"

    def rules(self):
        return {**attnlrp_rules(self.epsilon), "context": Uniform((0.0, 1.0))}
