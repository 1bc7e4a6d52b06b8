"""Layers of the causal 3D VAE as pure functions over official-key param dicts.

Shapes: B batch, C channels, T/H/W frames/height/width (pixels or latents), L = T*H*W
tokens, n = H*W tokens per frame.

Causality: every conv pads time with k-1 copies of the first frame and nothing after
(replicate, not zeros), so output frame t sees input frames <= t; the mid-block
attention lets a token see its own frame and earlier ones. Precision follows upstream's
fp16 autocast run: GroupNorm (and the SiLU after it) in fp32, convs / linears /
attention in the activation dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hvfunc.ops import linear
from hvfunc.params import Params, sub

EPS = 1e-6  # every GroupNorm of the VAE
_MKLDNN = torch.backends.mkldnn.is_available()  # read once: torch.compile cannot trace the call


def conv3d(x: Tensor, w: Tensor, b: Tensor | None, stride: tuple[int, int, int] = (1, 1, 1)) -> Tensor:
    """F.conv3d, but oneDNN on CPU for fp32 (same result within fp32 rounding).

    torch sends batch-1 inputs with B*C*T*H <= 20480 to its im2col `slow_conv3d`, 7-10x
    slower than oneDNN here: that covers every conv of a small model or a small tile.
    (bf16 / fp16 keep torch's choice: oneDNN's bf16 path depends on CPU features. Under
    torch.compile, which cannot trace the direct call, F.conv3d.)
    """
    if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.enabled and _MKLDNN \
            and not torch.compiler.is_compiling():
        return torch.mkldnn_convolution(x, w, b, [0, 0, 0], list(stride), [1, 1, 1], 1)
    return F.conv3d(x, w, b, stride)


def causal_conv(p: Params, x: Tensor, name: str, *, stride: tuple[int, int, int] = (1, 1, 1)) -> Tensor:
    """Conv3d `name` (cubic kernel k) after replicate padding (k//2 each side in H/W, k-1 before in T)."""
    w = p[f"{name}.weight"]
    k = w.shape[-1]
    if k > 1:
        x = F.pad(x, (k // 2, k // 2, k // 2, k // 2, k - 1, 0), mode="replicate")
    return conv3d(x, w, p[f"{name}.bias"], stride)


def group_norm(p: Params, x: Tensor, name: str, groups: int) -> Tensor:
    """GroupNorm in at least fp32 (autocast's choice upstream); the caller casts the result back."""
    dt = torch.promote_types(x.dtype, torch.float32)
    return F.group_norm(x.to(dt), groups, p[f"{name}.weight"].to(dt), p[f"{name}.bias"].to(dt), EPS)


def norm_act(p: Params, x: Tensor, name: str, groups: int) -> Tensor:
    """GroupNorm -> SiLU in fp32, back in x's dtype (the conv that follows runs in it)."""
    return F.silu(group_norm(p, x, name, groups)).to(x.dtype)


def resnet(p: Params, x: Tensor, *, groups: int) -> Tensor:
    """[B, Ci, T, H, W] -> [B, Co, T, H, W]: two (norm, SiLU, causal conv k3) plus a k1 shortcut if Ci != Co."""
    h = causal_conv(p, norm_act(p, x, "norm1", groups), "conv1.conv")
    h = causal_conv(p, norm_act(p, h, "norm2", groups), "conv2.conv")
    if "conv_shortcut.conv.weight" in p:
        x = causal_conv(p, x, "conv_shortcut.conv")
    return h.add_(x)  # in place on a fresh conv output: conv backward does not need it


def frame_causal_attention(q_B1LC: Tensor, k_B1LC: Tensor, v_B1LC: Tensor, n: int, frames: int) -> Tensor:
    """Single-head attention over L = frames x n tokens where frame t's n tokens see frames
    0..t: one SDPA per query frame.

    Equal to upstream's dense [L, L] -inf mask (a softmax over the allowed keys only) without
    building it: the mask alone would be 1.2 GB in fp32 for one 17 x 32 x 32 latent tile.
    (The loop counts frames, not range(0, L, n): under torch.compile with dynamic sizes the
    latter's length is a guard on H and W.)
    """
    return torch.cat([F.scaled_dot_product_attention(q_B1LC[:, :, i * n:(i + 1) * n], k_B1LC[:, :, :(i + 1) * n],
                                                     v_B1LC[:, :, :(i + 1) * n]) for i in range(frames)], dim=2)


def mid_attention(p: Params, x: Tensor, *, groups: int) -> Tensor:
    """x + to_out(attn(to_q, to_k, to_v of GroupNorm(x))) over all T*H*W tokens, one head of C channels."""
    B, C, T, H, W = x.shape
    h = group_norm(p, x, "group_norm", groups).to(x.dtype)
    h_BLC = h.permute(0, 2, 3, 4, 1).reshape(B, T * H * W, C)
    q, k, v = (linear(h_BLC, p, name).unsqueeze(1) for name in ("to_q", "to_k", "to_v"))
    o_BLC = linear(frame_causal_attention(q, k, v, H * W, T).squeeze(1), p, "to_out.0")
    return x + o_BLC.reshape(B, T, H, W, C).permute(0, 4, 1, 2, 3)


def mid_block(p: Params, x: Tensor, *, groups: int) -> Tensor:
    """ResNet -> (frame-causal attention, if the params hold it) -> ResNet; width unchanged."""
    x = resnet(sub(p, "resnets.0."), x, groups=groups)
    if "attentions.0.to_q.weight" in p:
        x = mid_attention(sub(p, "attentions.0."), x, groups=groups)
    return resnet(sub(p, "resnets.1."), x, groups=groups)


def upsample(p: Params, x: Tensor, factor: tuple[int, int, int]) -> Tensor:
    """Causal nearest upsampling then a k3 causal conv: frame 0 is only enlarged in space, the
    other T-1 frames are also repeated `factor[0]` times in time (T -> factor * (T-1) + 1)."""
    ft, fh, fw = factor
    T = x.shape[2]
    if ft > 1 and T > 1:
        idx = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(1, T).repeat_interleave(ft)])
        x = x.index_select(2, idx.to(x.device))
    if fh > 1 or fw > 1:  # nearest: a pure copy, exact in every dtype
        B, C, T, H, W = x.shape
        x = x[:, :, :, :, None, :, None].expand(B, C, T, H, fh, W, fw).reshape(B, C, T, H * fh, W * fw)
    return causal_conv(p, x, "conv.conv")
