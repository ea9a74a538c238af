"""timm's ``VisionTransformer`` (ViT, DeiT, DeiT III; distilled DeiT too) replayed on a tape.

timm is optional: this module imports it only when the model's class comes from timm (a
timm model means timm is loaded already). Supported: patch embedding by one Conv2d,
class / register / distillation tokens and position embedding (constants), pre-norm
blocks (``Block``: norm, attention, LayerScale, residual; norm, MLP, LayerScale,
residual), token or average pooling, ``fc_norm`` and the head. Refused, naming the
module: other block types, gated attention or MLPs, dynamic image sizes, attention
pooling, max pooling.
"""
import sys

import torch
from torch import nn

from ..errors import ManipBenchError
from .modules import attention, run

DESCRIPTION = "timm VisionTransformer (ViT, DeiT, DeiT III, distilled DeiT)"


def _timm(name):
    """timm's module ``name`` if timm is loaded, else None (nothing is imported)."""
    return sys.modules.get(f"timm.{name}")


def matches(model):
    vit = _timm("models.vision_transformer")
    return vit is not None and isinstance(model, vit.VisionTransformer)


def probe(model):
    height, width = model.patch_embed.img_size
    return torch.zeros(1, 3, height, width, dtype=model.patch_embed.proj.weight.dtype,
                       device=model.patch_embed.proj.weight.device)


def _patches(tape, embed, x):
    if not isinstance(embed.proj, nn.Conv2d) or not embed.flatten \
            or getattr(embed, "dynamic_img_pad", False):
        raise tape.refuse(embed, "only a Conv2d patch embedding that flattens to tokens "
                                 "(no dynamic padding) is supported")
    if tuple(x.shape[-2:]) != tuple(embed.img_size):
        raise ManipBenchError(f"the model takes {tuple(embed.img_size)} images, got "
                              f"{tuple(x.shape[-2:])}")
    tokens = run(tape, embed.proj, x)
    tokens = tape.apply("structure", lambda t: t.flatten(2).transpose(1, 2), tokens)
    return run(tape, embed.norm, tokens)


def _prefix(model, n):
    tokens = [getattr(model, name, None) for name in ("cls_token", "dist_token", "reg_token")]
    return [t.expand(n, -1, -1) for t in tokens if t is not None]


def _embed(tape, model, tokens):
    """Prefix tokens and position embedding (in timm's order for ``no_embed_class``)."""
    prefix = _prefix(model, tokens.shape[0])
    pos = model.pos_embed
    add_first = pos is not None and model.no_embed_class
    if add_first:
        tokens = tape.apply("structure", lambda t: t + pos, tokens)
    if prefix:
        tokens = tape.apply("structure", lambda t: torch.cat([*prefix, t], dim=1), tokens)
    if pos is not None and not add_first:
        tokens = tape.apply("structure", lambda t: t + pos, tokens)
    return tokens


def _attention(tape, module, x):
    timm_attention = _timm("layers.attention")
    if timm_attention is None or type(module) is not timm_attention.Attention:
        raise tape.refuse(module, "the block's attention must be timm's plain Attention")
    if getattr(module, "gate", None) is not None:
        raise tape.refuse(module, "gated attention has no AttnLRP rule here")
    return attention(tape, x, module.qkv.weight, module.qkv.bias, module.num_heads,
                     module.proj, q_norm=module.q_norm, k_norm=module.k_norm,
                     out_norm=module.norm)


def _scale(tape, module, x):
    """LayerScale (x * γ, a diagonal linear layer) or Identity."""
    if isinstance(module, nn.Identity):
        return x
    gamma = getattr(module, "gamma", None)
    if not isinstance(gamma, torch.Tensor):
        raise tape.refuse(module, "expected timm's LayerScale (x * gamma) or Identity")
    return tape.apply("linear", lambda t: t * gamma, x)


def _block(tape, block, tokens):
    vit, mlp = _timm("models.vision_transformer"), _timm("layers.mlp")
    if type(block) is not vit.Block:
        raise tape.refuse(block, "only timm's pre-norm Block is supported")
    if type(block.mlp) is not mlp.Mlp:
        raise tape.refuse(block.mlp, "only timm's plain Mlp is supported (no gated MLP)")
    mixed = _attention(tape, block.attn, run(tape, block.norm1, tokens))
    mixed = run(tape, block.drop_path1, _scale(tape, block.ls1, mixed))
    tokens = tape.apply("structure", torch.add, tokens, mixed)
    hidden = run(tape, block.norm2, tokens)
    for part in ("fc1", "act", "drop1", "norm", "fc2", "drop2"):
        hidden = run(tape, getattr(block.mlp, part), hidden)
    hidden = run(tape, block.drop_path2, _scale(tape, block.ls2, hidden))
    return tape.apply("structure", torch.add, tokens, hidden)


def _head(tape, model, tokens):
    if getattr(model, "head_dist", None) is not None:  # distilled DeiT: mean of two heads
        first = run(tape, model.head, tape.apply("structure", lambda t: t[:, 0], tokens))
        second = run(tape, model.head_dist, tape.apply("structure", lambda t: t[:, 1], tokens))
        return tape.apply("structure", lambda a, b: (a + b) / 2, first, second)
    if model.attn_pool is not None:
        raise tape.refuse(model.attn_pool, "attention pooling is not supported")
    if model.global_pool == "token":
        pooled = tape.apply("structure", lambda t: t[:, 0], tokens)
    elif model.global_pool == "avg":
        start = 0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens
        pooled = tape.apply("structure", lambda t: t[:, start:].mean(1), tokens)
    else:
        raise tape.refuse(model, f"global_pool={model.global_pool!r} is not supported "
                                 "(token or avg)")
    return run(tape, model.head, run(tape, model.fc_norm, pooled))


def forward(model, x, tape):
    """The model's logits for images ``x``, every operation recorded on ``tape``."""
    if getattr(model, "dynamic_img_size", False):
        raise tape.refuse(model, "dynamic_img_size is not supported")
    tokens = _embed(tape, model, _patches(tape, model.patch_embed, x))
    tokens = run(tape, model.norm_pre, run(tape, model.patch_drop, tokens))
    for block in model.blocks:
        tokens = _block(tape, block, tokens)
    return _head(tape, model, run(tape, model.norm, tokens))
