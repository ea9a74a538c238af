"""torchvision's ``VisionTransformer`` (vit_b_16 and friends, any size) replayed on a tape.

Patch embedding (a Conv2d: linear), class token and position embedding (constants: their
share of the relevance is absorbed, like a bias's), encoder blocks (LayerNorm, attention,
residual addition, LayerNorm, MLP, residual addition), final LayerNorm, class token,
head. A convolutional stem (``conv_stem_configs``) is refused.
"""
import torch
from torch import nn

from ..errors import ManipBenchError
from .modules import attention, run

DESCRIPTION = "torchvision VisionTransformer (vit_b_16, vit_l_32, ... any size)"


def matches(model):
    from torchvision.models.vision_transformer import VisionTransformer
    return isinstance(model, VisionTransformer)


def probe(model):
    """An input of the size the model takes (for a dry run at creation)."""
    dtype = next(model.parameters()).dtype
    return torch.zeros(1, 3, model.image_size, model.image_size, dtype=dtype,
                       device=model.class_token.device)


def self_attention(tape, module, x):
    """torchvision's encoder attention (``nn.MultiheadAttention``, batch first)."""
    if not isinstance(module, nn.MultiheadAttention):
        raise tape.refuse(module, "the encoder block's attention must be an "
                                  "nn.MultiheadAttention")
    unreadable = [why for why, bad in (
        ("separate key/value dimensions (kdim/vdim)", not module._qkv_same_embed_dim),
        ("bias_k/bias_v", module.bias_k is not None),
        ("add_zero_attn", module.add_zero_attn),
        ("batch_first=False", not module.batch_first)) if bad]
    if unreadable:
        raise tape.refuse(module, f"its attention uses {', '.join(unreadable)}, which the "
                                  "explicit attention of AttnLRP does not implement")
    return attention(tape, x, module.in_proj_weight, module.in_proj_bias, module.num_heads,
                     module.out_proj)


def forward(model, x, tape):
    """The model's logits for images ``x``, every operation recorded on ``tape``."""
    if not isinstance(model.conv_proj, nn.Conv2d):
        raise tape.refuse(model.conv_proj, "a convolutional stem is not supported (the patch "
                                           "embedding must be one Conv2d)")
    if x.shape[-2:] != (model.image_size, model.image_size):
        raise ManipBenchError(f"the model takes {model.image_size}x{model.image_size} images, "
                              f"got {tuple(x.shape[-2:])}")
    tokens = run(tape, model.conv_proj, x)
    tokens = tape.apply("structure", lambda t: t.flatten(2).transpose(1, 2), tokens)
    cls = model.class_token.expand(x.shape[0], -1, -1)
    tokens = tape.apply("structure", lambda t: torch.cat([cls, t], dim=1), tokens)
    encoder = model.encoder
    tokens = tape.apply("structure", lambda t: t + encoder.pos_embedding, tokens)
    for block in encoder.layers:
        for name in ("ln_1", "self_attention", "ln_2", "mlp"):
            if not hasattr(block, name):
                raise tape.refuse(block, f"an encoder block without '{name}' is not "
                                         "torchvision's EncoderBlock")
        mixed = self_attention(tape, block.self_attention, run(tape, block.ln_1, tokens))
        tokens = tape.apply("structure", torch.add, tokens, mixed)
        tokens = tape.apply("structure", torch.add, tokens,
                            run(tape, block.mlp, run(tape, block.ln_2, tokens)))
    tokens = run(tape, encoder.ln, tokens)
    return run(tape, model.heads, tape.apply("structure", lambda t: t[:, 0], tokens))
