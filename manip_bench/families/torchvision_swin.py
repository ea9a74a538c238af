"""torchvision's ``SwinTransformer`` (swin_t, swin_s, swin_b; not V2) replayed on a tape.

Stem (Conv2d, Permute, LayerNorm), stages of ``SwinTransformerBlock`` (LayerNorm, shifted
window attention, residual; LayerNorm, MLP, residual), ``PatchMerging`` (2x2 neighbours
concatenated, LayerNorm, Linear), final LayerNorm, average pooling and head. Window
attention is the written-out attention of :mod:`.modules` on each window; the relative
position bias and the shift mask are constants added to the scores (a bias's share of the
relevance is absorbed). Swin V2 (cosine attention, post-norm blocks) is refused.
"""
import torch
from torch import nn
from torch.nn import functional as F

from .modules import attention, run

DESCRIPTION = "torchvision SwinTransformer (swin_t, swin_s, swin_b)"


def matches(model):
    from torchvision.models.swin_transformer import SwinTransformer
    return isinstance(model, SwinTransformer)


def probe(model):
    """A 224x224 input: any size divisible by the patch size works; this is ImageNet's."""
    stem = model.features[0][0]
    return torch.zeros(1, stem.in_channels, 224, 224, dtype=stem.weight.dtype,
                       device=stem.weight.device)


def _shift_mask(height, width, window, shift, like):
    """The additive mask (windows, S, S) that keeps shifted windows from mixing regions."""
    region = like.new_zeros(height, width)
    count = 0
    for h in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for w in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            region[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    region = region.view(height // window[0], window[0], width // window[1], window[1])
    region = region.transpose(1, 2).reshape(-1, window[0] * window[1])
    different = region[:, None, :] != region[:, :, None]
    return torch.zeros_like(different, dtype=like.dtype).masked_fill(different, -100.0)


def _window_attention(tape, module, x):
    """torchvision's ``ShiftedWindowAttention`` on x (B, H, W, C)."""
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    if type(module) is not ShiftedWindowAttention:
        raise tape.refuse(module, "only Swin V1's ShiftedWindowAttention is supported")
    window = list(module.window_size)
    batch, height, width, channels = x.shape
    pad = [(w - size % w) % w for w, size in zip(window, (height, width))]
    padded_h, padded_w = height + pad[0], width + pad[1]
    shift = [s if w < p else 0 for s, w, p in zip(module.shift_size, window,
                                                   (padded_h, padded_w))]
    rows, cols = padded_h // window[0], padded_w // window[1]

    def partition(t):
        t = F.pad(t, (0, 0, 0, pad[1], 0, pad[0]))
        if any(shift):
            t = t.roll((-shift[0], -shift[1]), (1, 2))
        t = t.view(batch, rows, window[0], cols, window[1], channels).transpose(2, 3)
        return t.reshape(batch * rows * cols, window[0] * window[1], channels)

    def reverse(t):
        t = t.view(batch, rows, cols, window[0], window[1], channels).transpose(2, 3)
        t = t.reshape(batch, padded_h, padded_w, channels)
        if any(shift):
            t = t.roll((shift[0], shift[1]), (1, 2))
        return t[:, :height, :width]

    bias = module.get_relative_position_bias()  # (1, heads, S, S)
    if any(shift):
        mask = _shift_mask(padded_h, padded_w, window, shift, x)  # (windows, S, S)
        bias = (bias + mask[:, None]).repeat(batch, 1, 1, 1)
    windows = tape.apply("structure", partition, x)
    mixed = attention(tape, windows, module.qkv.weight, module.qkv.bias, module.num_heads,
                      module.proj, score_bias=lambda scores: scores + bias)
    return tape.apply("structure", reverse, mixed)


def _merge(tape, module, x):
    def neighbours(t):
        t = F.pad(t, (0, 0, 0, t.shape[-2] % 2, 0, t.shape[-3] % 2))
        return torch.cat([t[..., 0::2, 0::2, :], t[..., 1::2, 0::2, :],
                          t[..., 0::2, 1::2, :], t[..., 1::2, 1::2, :]], -1)

    return run(tape, module.reduction, run(tape, module.norm,
                                           tape.apply("structure", neighbours, x)))


def _block(tape, block, x):
    mixed = run(tape, block.stochastic_depth,
                _window_attention(tape, block.attn, run(tape, block.norm1, x)))
    x = tape.apply("structure", torch.add, x, mixed)
    mlp = run(tape, block.stochastic_depth, run(tape, block.mlp, run(tape, block.norm2, x)))
    return tape.apply("structure", torch.add, x, mlp)


def _walk(tape, module, x):
    from torchvision.models.swin_transformer import PatchMerging, SwinTransformerBlock
    from torchvision.ops.misc import Permute

    if type(module) is SwinTransformerBlock:
        return _block(tape, module, x)
    if type(module) is PatchMerging:
        return _merge(tape, module, x)
    if isinstance(module, Permute):
        return tape.apply("structure", module, x)
    if isinstance(module, nn.Sequential):
        for child in module:
            x = _walk(tape, child, x)
        return x
    if type(module).__name__.endswith("V2"):
        raise tape.refuse(module, "Swin V2 (cosine attention, post-norm blocks) is not "
                                  "supported")
    return run(tape, module, x)


def forward(model, x, tape):
    """The model's logits for images ``x``, every operation recorded on ``tape``."""
    x = _walk(tape, model.features, x)
    x = _walk(tape, model.permute, run(tape, model.norm, x))
    return run(tape, model.head, run(tape, model.flatten, run(tape, model.avgpool, x)))
