"""AttnLRP and CP-LRP on torchvision's VisionTransformer: lxt's map, conservation,
the derivative in x (finite differences), refusals, and an attack that moves the map."""
import copy
import importlib
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torchvision.models import VisionTransformer

from manip_bench import ManipBenchError, ManipulationAttack, attributors, metrics
from manip_bench.attributors import transformer_lrp
from manip_bench.attributors.transformer_lrp import Epsilon, Tape

NAMES = ["lrp.attnlrp", "lrp.cp_lrp"]
TARGET = torch.tensor([1, 3])


def tiny_vit(image_size=16, dtype=torch.float64, seed=0):
    """2 layers, hidden 32, 2 heads, MLP 64, patch 8; torchvision zeroes the head, so it is
    re-initialised (normal, std 0.1) to give non-zero maps."""
    torch.manual_seed(seed)
    model = VisionTransformer(image_size=image_size, patch_size=8, num_layers=2, num_heads=2,
                              hidden_dim=32, mlp_dim=64, num_classes=5)
    nn.init.normal_(model.heads.head.weight, std=0.1)
    return model.to(dtype).eval()


def without_biases(model):
    """A copy with every bias-like constant zero: biases, class token, position embedding."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or name in ("class_token", "encoder.pos_embedding"):
                parameter.zero_()
    return model


def images(n=2, size=16, dtype=torch.float64):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------- lxt as the reference

def load_lxt():
    """lxt 2.1's efficient patch functions and rules. ``lxt.efficient``'s ``__init__``
    imports its Hugging Face tables (and so ``transformers``); the torchvision patches need
    only torch, so without ``transformers`` the two submodules are loaded under a bare
    package entry, which is removed again afterwards."""
    import lxt
    try:
        from lxt.efficient import patches, rules
    except ImportError:
        saved = {key: sys.modules.pop(key) for key in list(sys.modules)
                 if key.startswith("lxt.efficient")}
        package = types.ModuleType("lxt.efficient")
        package.__path__ = [str(Path(lxt.__file__).parent / "efficient")]
        sys.modules["lxt.efficient"] = package
        try:
            patches = importlib.import_module("lxt.efficient.patches")
            rules = importlib.import_module("lxt.efficient.rules")
        finally:
            for key in [k for k in sys.modules if k.startswith("lxt.efficient")]:
                del sys.modules[key]
            sys.modules.update(saved)
    return patches, rules


@pytest.fixture(scope="module")
def lxt_patches():
    pytest.importorskip("lxt", reason="lxt (pip install --no-deps lxt==2.1) is the reference "
                                      "for the transformer LRP maps")
    return load_lxt()


def lxt_model(model, patches, rules, cp):
    """A copy of ``model`` with lxt's rules bound to its modules (instances only: lxt's
    ``monkey_patch`` would change the classes for the whole process). lxt ships CP-LRP
    for torchvision's attention; AttnLRP's attention is lxt's own wrapper for Hugging Face
    attention (uniform rule: q and k gradients / 4, v / 2, softmax by its gradient)."""
    def attnlrp_attention(self, query, key, value, *args, **kwargs):
        return self.original_forward(rules.divide_gradient(query, 4),
                                     rules.divide_gradient(key, 4),
                                     rules.divide_gradient(value, 2), *args, **kwargs)

    patched = copy.deepcopy(model)
    for module in patched.modules():
        if isinstance(module, nn.LayerNorm):
            module.forward = types.MethodType(patches.layer_norm_forward, module)
        elif isinstance(module, (nn.GELU, nn.MultiheadAttention)):
            module.original_forward = module.forward
            forward = (patches.non_linear_forward if isinstance(module, nn.GELU)
                       else patches.cp_multi_head_attention_forward if cp
                       else attnlrp_attention)
            module.forward = types.MethodType(forward, module)
    return patched


def lxt_relevance(patched, x, target, create_graph=False):
    """lxt's relevance: input x gradient of the patched model's target logit (PyTorch's
    math attention: the fused CPU kernel has no double backward)."""
    with sdpa_kernel(SDPBackend.MATH):
        output = patched(x)
        (gradient,) = torch.autograd.grad(output.gather(1, target[:, None]).sum(), x,
                                          create_graph=create_graph)
    return x * gradient


@pytest.mark.parametrize("name", NAMES)
def test_map_equals_lxt(name, lxt_patches):
    """epsilon=0: lxt's patches leave linear layers to plain gradients (LRP-0)."""
    model, x = tiny_vit(), images()
    patched = lxt_model(model, *lxt_patches, cp=name == "lrp.cp_lrp")
    expected = lxt_relevance(patched, x.clone().requires_grad_(), TARGET)
    relevance = attributors.create(name, model, epsilon=0.0)(x, TARGET)[1]
    assert relative_error(relevance, expected) <= 1e-4


def test_lxt_derivative_in_x_is_not_attnlrps(lxt_patches):
    """Same map, different derivative: lxt's detach and custom Functions cut terms that the
    attack needs (the reason this module computes the rules itself)."""
    model, x = tiny_vit(), images()
    patched = lxt_model(model, *lxt_patches, cp=False)
    weights = torch.rand(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    explain = attributors.create("lrp.attnlrp", model, epsilon=0.0)
    derivatives = []
    for relevance_of in (lambda v: lxt_relevance(patched, v, TARGET, create_graph=True),
                         lambda v: explain(v, TARGET)[1]):
        v = x.clone().requires_grad_()
        (gradient,) = torch.autograd.grad((relevance_of(v) * weights).sum(), v)
        derivatives.append(gradient)
    assert relative_error(derivatives[0], derivatives[1]) > 0.05


def test_epsilon_rule_equals_zennits():
    """The ε rule on a linear and a convolution, against Zennit's Epsilon (relevance seeded
    with the output, as LRP does)."""
    from zennit.composites import LayerMapComposite
    from zennit.rules import Epsilon as ZennitEpsilon
    from zennit.types import Linear

    torch.manual_seed(0)
    for layer, x in ((nn.Linear(6, 4), torch.randn(3, 6)),
                     (nn.Conv2d(3, 4, 2, stride=2), torch.randn(2, 3, 4, 4))):
        layer = layer.double()
        x = x.double().requires_grad_()
        composite = LayerMapComposite([(Linear, ZennitEpsilon(epsilon=0.3))])
        with composite.context(layer) as hooked:
            z = hooked(x)
            (expected,) = torch.autograd.grad(z, x, z)
        tape = Tape({"linear": Epsilon(0.3)})
        output = tape.apply("linear", layer, x, module=layer)
        assert torch.allclose(tape.relevance(x, output, torch.ones_like(output)), expected,
                              rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("module", [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(),
                                    nn.ReLU()], ids=repr)
def test_identity_rule_secants_are_f_of_x_over_x(module):
    x = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    x = x[x != 0]
    assert torch.allclose(transformer_lrp.SECANTS[type(module)](module, x), module(x) / x,
                          rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ the forward and conservation

@pytest.mark.parametrize("name", NAMES)
def test_output_is_the_models_and_the_model_is_untouched(name):
    model, x = tiny_vit(), images()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    model.train()
    output, relevance = attributors.create(name, model)(x, TARGET)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    assert type(model.encoder.layers[0].self_attention) is nn.MultiheadAttention
    assert torch.allclose(output, model.eval()(x), rtol=1e-10, atol=1e-12)
    assert relevance.shape == x.shape and relevance.abs().sum() > 0


def conservation(name, model, **options):
    output, relevance = attributors.create(name, model, **options)(images(), TARGET)
    return attributors.total_relevance(relevance) / output.gather(1, TARGET[:, None])[:, 0]


def test_cp_lrp_conserves_the_logit_without_biases():
    ratio = conservation("lrp.cp_lrp", without_biases(tiny_vit()))
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-4), ratio


def test_attnlrp_loses_exactly_what_the_softmax_rule_absorbs():
    """AttnLRP's softmax rule is not conservative: R_in = s_in (R_out - p sum R_out) sums to
    less than R_out. Without biases (ε = 0) every other rule conserves, so the logit minus
    the total relevance is the sum over softmax operations of what each absorbed."""
    absorbed = []

    class Recorded(transformer_lrp.Gradient):
        def backward(self, grad, op):
            (g_in,) = super().backward(grad, op)
            absorbed.append(((op.output * grad).flatten(1).sum(1)
                             - (op.inputs[0] * g_in).flatten(1).sum(1)).detach())
            return (g_in,)

    class Recording(transformer_lrp.AttnLRP):
        def rules(self):
            return {**super().rules(), "softmax": Recorded()}

    model, x = without_biases(tiny_vit()), images()
    output, relevance = Recording(model, epsilon=0.0)(x, TARGET)
    logit = output.gather(1, TARGET[:, None])[:, 0]
    total = attributors.total_relevance(relevance)
    assert ((total / logit - 1).abs() > 0.05).all()  # measured: 0.48, 0.49
    assert len(absorbed) == 2
    assert torch.allclose(logit - total, sum(absorbed), rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------- derivative in x

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("biases", [True, False])
def test_relevance_jacobian_matches_finite_differences(name, biases):
    """gradcheck (float64) of the relevance itself, in gradcheck's fast mode (the Jacobian
    projected on random vectors); ε = 1e-3 keeps the finite differences away from the ε
    rule's poles. The full Jacobian is checked in the slow test below."""
    model = tiny_vit() if biases else without_biases(tiny_vit())
    explain = attributors.create(name, model, epsilon=1e-3)
    x = images().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: explain(v, TARGET)[1], (x,), eps=1e-6,
                                    atol=1e-7, rtol=1e-4, fast_mode=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_loss_gradient_matches_finite_differences_everywhere(name):
    """Full gradcheck (float64, every input entry) of a map loss on the relevance."""
    explain = attributors.create(name, tiny_vit(), epsilon=1e-3)
    weights = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2),
                         dtype=torch.float64)

    def loss(v):
        return (explain(v, TARGET[:1])[1] - weights).square().sum()

    x = images(1).requires_grad_()
    assert torch.autograd.gradcheck(loss, (x,), eps=1e-6, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_loss_on_relevance_has_nonzero_gradient(name):
    """Guards against a disconnected graph (a constant map passes gradcheck)."""
    explain = attributors.create(name, tiny_vit(dtype=torch.float32))
    x = images(dtype=torch.float32).requires_grad_()
    relevance = explain(x, TARGET)[1]
    (gradient,) = torch.autograd.grad(relevance.square().sum(), x)
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


# ---------------------------------------------------------------------------- refusals

def test_a_model_without_a_family_table_is_refused(plain_cnn):
    with pytest.raises(ManipBenchError, match="no transformer family table for a PlainCNN"):
        attributors.create("lrp.attnlrp", plain_cnn)


def test_an_attention_it_cannot_read_is_refused_by_name():
    model = tiny_vit()
    model.encoder.layers[1].self_attention = nn.MultiheadAttention(
        32, 2, add_bias_kv=True, batch_first=True).double()
    with pytest.raises(ManipBenchError, match=r"encoder\.layers\.encoder_layer_1\."
                                              r"self_attention.*bias_k/bias_v"):
        attributors.create("lrp.attnlrp", model)


def test_an_unknown_module_in_a_block_is_refused_by_name():
    class Attention(nn.Module):
        def forward(self, q, k, v, need_weights=False):
            return q, None

    model = tiny_vit()
    model.encoder.layers[0].self_attention = Attention()
    with pytest.raises(ManipBenchError, match=r"encoder_layer_0\.self_attention' "
                                              r"\(Attention\).*nn\.MultiheadAttention"):
        attributors.create("lrp.cp_lrp", model)
    model = tiny_vit()
    model.encoder.layers[0].mlp[1] = nn.Softmax(-1)
    with pytest.raises(ManipBenchError, match=r"encoder_layer_0\.mlp\.1' \(Softmax\)"):
        attributors.create("lrp.cp_lrp", model)


def test_groups_and_facts():
    assert attributors.GROUPS["transformer"] == NAMES
    assert not set(NAMES) & set(attributors.GROUPS["all"])  # CNN grids use "all"
    for name in NAMES:
        cls = attributors.get_class(name)
        assert cls.attackable and not cls.needs_softplus and cls.conserving
        assert cls.preset == "lrp" and issubclass(cls, transformer_lrp.TransformerLRP)


# -------------------------------------------------------------------------------- Swin

def tiny_swin(v2=False):
    """Two stages (depth 2 each: one plain and one shifted window), window 4, dim 16."""
    from torchvision.models import swin_transformer as swin

    torch.manual_seed(0)
    options = dict(block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2) \
        if v2 else {}
    return swin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2],
                                num_heads=[2, 2], window_size=[4, 4], num_classes=5,
                                **options).double().eval()


@pytest.mark.parametrize("size", [32, 40], ids=["shifted", "padded"])
@pytest.mark.parametrize("name", NAMES)
def test_swin_explains_differentiates_and_conserves(name, size):
    """32x32: 8x8 tokens, shifted windows with their mask; 40x40: 10x10 tokens padded to
    windows, 5x5 after merging. Logits are the model's, gradcheck (fast mode) passes, and
    CP-LRP conserves without biases (relative position bias and mask only shift scores)."""
    model, x = tiny_swin(), images(size=size)
    explain = attributors.create(name, model, epsilon=1e-3)
    output, _ = explain(x, TARGET)
    assert torch.allclose(output, model(x), rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda v: explain(v, TARGET)[1], (x.requires_grad_(),),
                                    eps=1e-6, atol=1e-7, rtol=1e-4, fast_mode=True)
    if name == "lrp.cp_lrp":
        bare = copy.deepcopy(model)
        with torch.no_grad():
            for key, parameter in bare.named_parameters():
                if key.endswith("bias"):
                    parameter.zero_()
        ratio = conservation(name, bare, epsilon=0.0)
        assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-4), ratio


def test_swin_v2_is_refused_by_name():
    with pytest.raises(ManipBenchError, match=r"'features\.1\.0' \(SwinTransformerBlockV2\)"):
        attributors.create("lrp.attnlrp", tiny_swin(v2=True))


# -------------------------------------------------------------------------------- timm

def timm_twin(model):
    """timm's VisionTransformer with the weights of torchvision's ``model`` (tiny_vit)."""
    timm = pytest.importorskip("timm", reason="timm is the optional extra for timm's ViT/DeiT")
    twin = timm.models.vision_transformer.VisionTransformer(
        img_size=model.image_size, patch_size=model.patch_size, embed_dim=model.hidden_dim,
        depth=len(model.encoder.layers), num_heads=2, mlp_ratio=2, qkv_bias=True,
        num_classes=5).to(model.class_token.dtype).eval()
    names = {"conv_proj": "patch_embed.proj", "class_token": "cls_token",
             "encoder.pos_embedding": "pos_embed", "encoder.ln": "norm", "heads.head": "head"}
    for i in range(len(model.encoder.layers)):
        names.update({f"encoder.layers.encoder_layer_{i}.{a}": f"blocks.{i}.{b}" for a, b in (
            ("ln_1", "norm1"), ("ln_2", "norm2"), ("mlp.0", "mlp.fc1"), ("mlp.3", "mlp.fc2"),
            ("self_attention.out_proj", "attn.proj"),
            ("self_attention.in_proj_weight", "attn.qkv.weight"),
            ("self_attention.in_proj_bias", "attn.qkv.bias"))})
    state = {}
    for key, value in model.state_dict().items():
        prefix = max((p for p in names if key == p or key.startswith(p + ".")), key=len)
        state[names[prefix] + key[len(prefix):]] = value
    twin.load_state_dict(state)
    return twin


@pytest.mark.parametrize("name", NAMES)
def test_timm_vit_gets_the_map_of_its_torchvision_twin(name):
    model, x = tiny_vit(), images()
    twin = timm_twin(model)
    assert torch.allclose(twin(x), model(x), rtol=1e-10, atol=1e-12)
    expected = attributors.create(name, model)(x, TARGET)[1]
    assert relative_error(attributors.create(name, twin)(x, TARGET)[1], expected) <= 1e-10


@pytest.mark.parametrize("options", [
    dict(class_token=True, global_pool="avg", fc_norm=True, qk_norm=True, init_values=0.1,
         reg_tokens=2, no_embed_class=True),
    dict(distilled=True)], ids=["avg-qknorm-layerscale-registers", "distilled-deit"])
def test_timm_variants_explain_and_differentiate(options):
    """Average pooling, q/k LayerNorm, LayerScale, register tokens, distilled DeiT: the
    logits are timm's, CP-LRP conserves without biases, gradcheck (fast mode) passes."""
    timm = pytest.importorskip("timm", reason="timm is the optional extra for timm's ViT/DeiT")
    options = dict(options)
    distilled = options.pop("distilled", False)
    cls = (timm.models.deit.VisionTransformerDistilled if distilled
           else timm.models.vision_transformer.VisionTransformer)
    torch.manual_seed(0)
    model = cls(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                num_classes=5, **options).double().eval()
    x = images()
    explain = attributors.create("lrp.attnlrp", model, epsilon=1e-3)
    output, _ = explain(x, TARGET)
    assert torch.allclose(output, model(x), rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda v: explain(v, TARGET)[1], (x.requires_grad_(),),
                                    eps=1e-6, atol=1e-7, rtol=1e-4, fast_mode=True)
    bare = copy.deepcopy(model)
    with torch.no_grad():
        for key, parameter in bare.named_parameters():
            if key.endswith(("bias", "_token", "pos_embed")):
                parameter.zero_()
    ratio = conservation("lrp.cp_lrp", bare, epsilon=0.0)
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-4), ratio


def test_timm_modules_it_cannot_read_are_refused_by_name():
    timm = pytest.importorskip("timm", reason="timm is the optional extra for timm's ViT/DeiT")
    vit = timm.models.vision_transformer.VisionTransformer
    model = vit(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                num_classes=5).eval()
    model.blocks[1].attn = timm.layers.attention.Attention(32, 2, gated=True)
    with pytest.raises(ManipBenchError, match=r"'blocks\.1\.attn' \(Attention\): gated"):
        attributors.create("lrp.cp_lrp", model)
    model = vit(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                mlp_layer=timm.layers.SwiGLUPacked, act_layer=nn.SiLU).eval()
    with pytest.raises(ManipBenchError, match=r"'blocks\.0\.mlp' \(GluMlp\)"):
        attributors.create("lrp.attnlrp", model)


# ------------------------------------------------------------------------------ attack

@pytest.mark.parametrize("name", NAMES)
def test_attack_moves_the_map(name):
    """Random tiny ViT at 32x32 (patch 8), the engine's auto schedule. Inside 8/255 the
    maps of this random network move little (measured +0.08..0.12 PCC); at 32/255 they
    move far (measured 0.48 -> 0.72..0.82)."""
    model = tiny_vit(image_size=32, dtype=torch.float32)
    x = images(2, 32, torch.float32)
    x_target = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    attack = ManipulationAttack(model, name, iterations=60, budget="32/255")
    result = attack(x, attack.target_maps(x_target))
    before = metrics.map_similarity(result.original_map, result.target_map)["pcc"]
    after = result.metrics["expl_target_pcc"]
    for b, a in zip(before, after):
        assert a > b + 0.2, (before, after)
    assert max(result.metrics["input_linf"]) <= 32 / 255 + 1e-6
    assert len(result.metrics["relevance_conservation"]) == 2


class Shift(nn.Module):
    """A user's input normalisation (x - 0.5) / 0.25, in front of the transformer."""

    def forward(self, x):
        return (x - 0.5) / 0.25


@pytest.mark.parametrize("name", ["lrp.attnlrp", "lrp.cp_lrp"])
def test_a_transformer_behind_a_normalisation_is_explained(name):
    """nn.Sequential(normalize, vit): the relevance at the transformer's input, handed to the
    image unchanged (as the Zennit attributors do), differentiable in the image."""
    vit = tiny_vit()
    x = images()
    wrapped = attributors.create(name, nn.Sequential(Shift(), vit))
    output, relevance = wrapped(x, 1)
    bare_output, bare_relevance = attributors.create(name, vit)((x - 0.5) / 0.25, 1)
    assert relative_error(output, bare_output) < 1e-12
    assert relative_error(relevance, bare_relevance) < 1e-10
    x = images(1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: wrapped(x, 1)[1].pow(2).sum(), (x,),
                                    fast_mode=True)


def test_a_wrapper_that_does_more_than_normalise_is_refused():
    class Squared(nn.Module):
        def forward(self, x):
            return x * x

    with pytest.raises(ManipBenchError, match="not an elementwise affine normalisation"):
        attributors.create("lrp.attnlrp", nn.Sequential(Squared(), tiny_vit()))
    with pytest.raises(ManipBenchError, match="is not its transformer"):
        attributors.create("lrp.attnlrp", nn.Sequential(Shift(), tiny_vit(), nn.Softmax(1)))
