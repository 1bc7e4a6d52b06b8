"""The HunyuanVideo DiT as pure functions over a flat param dict (hvfunc layout).

Shapes: B batch, C latent channels, T/H/W latent frames/height/width, L video tokens,
S text tokens, D width, N heads, K head dim, M MLP hidden.

Pipeline: embed (patches, timestep/guidance/CLIP vector, token refiner, RoPE tables)
-> double-stream blocks (own img/txt weights, joint attention [img | txt])
-> single-stream blocks (one stream over [img | txt]) -> final layer -> unpatchify.
Text tokens never get RoPE. `attn` is injected (hvfunc.attention); block functions
are injectable too (`Blocks`) so graphs/ and parallel/ can wrap them (compile, gather,
remat), and `TPHooks` mark where tensor parallelism enters and leaves a block.
LoRA adapter leaves in the tree (`<stem>.lora_A` / `.lora_B`, hvfunc.lora) run unmerged
inside the same linear primitives (hvfunc.ops); a tree without them computes as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hvfunc import ops
from hvfunc.attention import AttnFn, sdpa
from hvfunc.config import DiTConfig
from hvfunc.ops import gate, layer_norm, linear, modulate, split_first
from hvfunc.params import Params, sub

EPS = 1e-6  # every LayerNorm / RMSNorm of the DiT

Hook = Callable[[Tensor, str], Tensor]


def _same(x: Tensor, stream: str = "") -> Tensor:
    return x


@dataclass(frozen=True)
class TPHooks:
    """Where a tensor-parallel region starts and ends inside a block (identity without TP).

    `enter` runs before column-parallel matmuls (q|k|v, fc1, linear1), `leave` after the
    row-parallel ones (attn proj, fc2, linear2) and before their bias. `stream` is "img",
    "txt" or "joint" (single blocks). With TP the weights given to a block are local
    shards, so head counts are taken from shapes, never from the config.

    Sequence parallelism (`sp` = (rank, size)) also splits the tokens of the residual
    stream over tp outside those regions: video tokens always, text tokens in single
    blocks. `split` takes this rank's share of a replicated sequence [B, L, D] (dim 1), and
    `cond` marks a modulation input that acts on split tokens (identity forward; the
    gradient is summed over tp, so the shared vector's gradient is whole on every rank).
    """

    enter: Hook = _same
    leave: Hook = _same
    cond: Callable[[Tensor], Tensor] = _same
    split: Callable[[Tensor], Tensor] = _same
    sp: tuple[int, int] | None = None


NO_TP = TPHooks()


def _cond(tp: TPHooks, vec: Tensor, vec_first: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Both modulation inputs through one tp.cond: a rank holding no frame-0 token leaves
    vec_first unused, and its gradient collective must still run on every rank."""
    if vec_first is None:
        return tp.cond(vec), None
    both = tp.cond(torch.stack([vec, vec_first]))
    return both[0], both[1]


def _partial(p: Params, name: str, x: Tensor) -> Tensor:
    """Row-parallel matmul x @ W.T and its adapter B @ (A x): both partial sums over tp (A and x
    are split over tp, B whole), so the one reduction in _row covers the adapter too."""
    return ops.lora_up(ops.matmul(x, p[f"{name}.weight"]), ops.lora_down(x, p, name), p, name)


def _row(tp: TPHooks, y: Tensor, p: Params, name: str, stream: str) -> Tensor:
    """Row-parallel output: reduce partial sums across tp, then add the (replicated) bias."""
    y = tp.leave(y, stream)
    b = p.get(f"{name}.bias")
    return y if b is None else y + b


def _qk_norm(p: Params, q: Tensor, k: Tensor, qn: str, kn: str) -> tuple[Tensor, Tensor]:
    if f"{qn}.weight" not in p:
        return q, k
    return ops.rms_norm(q, p[f"{qn}.weight"], EPS), ops.rms_norm(k, p[f"{kn}.weight"], EPS)


def refiner_block(p: Params, x_BSD: Tensor, c_BD: Tensor, kv_len: Tensor | None, *, cfg: DiTConfig,
                  attn: AttnFn) -> Tensor:
    """Token refiner block: affine LayerNorms, gates only (no shift/scale), SiLU MLP, no qk norm."""
    g_msa, g_mlp = linear(F.silu(c_BD), p, "adaLN_modulation.1").chunk(2, dim=-1)
    h = layer_norm(x_BSD, EPS, p["norm1.weight"], p["norm1.bias"])
    q, k, v = ops.qkv(h, p, "self_attn_qkv", cfg.head_dim)
    x_BSD = gate(x_BSD, linear(attn(q, k, v, kv_len).flatten(2), p, "self_attn_proj"), g_msa)
    h = layer_norm(x_BSD, EPS, p["norm2.weight"], p["norm2.bias"])
    return gate(x_BSD, linear(F.silu(linear(h, p, "mlp.fc1")), p, "mlp.fc2"), g_mlp)


def double_block(p: Params, img: Tensor, txt: Tensor, vec: Tensor, *, rope: tuple[Tensor, Tensor],
                 kv_len: Tensor | None, cfg: DiTConfig, attn: AttnFn, vec_first: Tensor | None = None,
                 first: int = 0, tp: TPHooks = NO_TP) -> tuple[Tensor, Tensor]:
    """img [B, L, D], txt [B, S, D], vec [B, D] -> img, txt. Joint attention over [img | txt].

    Modulation chunks: shift1, scale1, gate1, shift2, scale2, gate2. The leading `first`
    img tokens use `vec_first`'s modulation (I2V token_replace).
    """
    vc, vfc = _cond(tp, vec, vec_first)
    mi = linear(F.silu(vc), p, "img_mod.linear").chunk(6, dim=-1)
    mt = linear(F.silu(vec), p, "txt_mod.linear").chunk(6, dim=-1)
    mf = None if vfc is None else linear(F.silu(vfc), p, "img_mod.linear").chunk(6, dim=-1)
    f = (lambda a, b: None) if mf is None else (lambda a, b: mf[a:b])
    K = cfg.head_dim

    h = tp.enter(split_first(modulate, first, (layer_norm(img, EPS),), mi[0:2], f(0, 2)), "img")
    qi, ki, vi = ops.qkv(h, p, "img_attn_qkv", K)
    qi, ki = _qk_norm(p, qi, ki, "img_attn_q_norm", "img_attn_k_norm")
    qi, ki = ops.apply_rope(qi, *rope), ops.apply_rope(ki, *rope)
    h = tp.enter(modulate(layer_norm(txt, EPS), mt[0], mt[1]), "txt")
    qt, kt, vt = ops.qkv(h, p, "txt_attn_qkv", K)
    qt, kt = _qk_norm(p, qt, kt, "txt_attn_q_norm", "txt_attn_k_norm")

    o = attn(torch.cat([qi, qt], 1), torch.cat([ki, kt], 1), torch.cat([vi, vt], 1), kv_len).flatten(2)
    L = qi.shape[1]
    y = _row(tp, _partial(p, "img_attn_proj", o[:, :L]), p, "img_attn_proj", "img")
    img = split_first(gate, first, (img, y), mi[2:3], f(2, 3))
    txt = gate(txt, _row(tp, _partial(p, "txt_attn_proj", o[:, L:]), p, "txt_attn_proj", "txt"), mt[2])

    h = tp.enter(split_first(modulate, first, (layer_norm(img, EPS),), mi[3:5], f(3, 5)), "img")
    img = split_first(gate, first, (img, _mlp(p, "img_mlp", h, tp, "img")), mi[5:6], f(5, 6))
    h = tp.enter(modulate(layer_norm(txt, EPS), mt[3], mt[4]), "txt")
    txt = gate(txt, _mlp(p, "txt_mlp", h, tp, "txt"), mt[5])
    return img, txt


def _mlp(p: Params, name: str, h: Tensor, tp: TPHooks, stream: str) -> Tensor:
    a = F.gelu(linear(h, p, f"{name}.fc1"), approximate="tanh")
    return _row(tp, _partial(p, f"{name}.fc2", a), p, f"{name}.fc2", stream)


def single_block(p: Params, x: Tensor, vec: Tensor, *, n_txt: int, rope: tuple[Tensor, Tensor],
                 kv_len: Tensor | None, cfg: DiTConfig, attn: AttnFn, vec_first: Tensor | None = None,
                 first: int = 0, tp: TPHooks = NO_TP) -> Tensor:
    """x = [img | txt] [B, L + S, D] -> same. Parallel attention and MLP off one modulated input.

    n_txt counts the text tokens of the whole sequence inside the tp region (x may hold a
    sequence-parallel share of both parts)."""
    vc, vfc = _cond(tp, vec, vec_first)
    m = linear(F.silu(vc), p, "modulation.linear").chunk(3, dim=-1)
    mf = None if vfc is None else linear(F.silu(vfc), p, "modulation.linear").chunk(3, dim=-1)
    h = tp.enter(split_first(modulate, first, (layer_norm(x, EPS),), m[0:2], None if mf is None else mf[0:2]),
                 "joint")
    u = ops.lora_down(h, p, "linear1")  # linear1's adapter: one A for its q|k|v and MLP rows
    q, k, v = ops.qkv(h, p, "linear1_qkv", cfg.head_dim, u=u)
    q, k = _qk_norm(p, q, k, "q_norm", "k_norm")
    L = q.shape[1] - n_txt
    q = torch.cat([ops.apply_rope(q[:, :L], *rope), q[:, L:]], 1)
    k = torch.cat([ops.apply_rope(k[:, :L], *rope), k[:, L:]], 1)
    o = attn(q, k, v, kv_len).flatten(2)
    mlp = F.gelu(linear(h, p, "linear1_mlp", u=u), approximate="tanh")
    y = ops.matmul(o, p["linear2_attn.weight"]) + ops.matmul(mlp, p["linear2_mlp.weight"])
    ua, um = ops.lora_down(o, p, "linear2_attn"), ops.lora_down(mlp, p, "linear2_mlp")
    y = ops.lora_up(y, None if ua is None else ua + um, p, "linear2")  # linear2's adapter: one B
    y = _row(tp, y, p, "linear2", "joint")
    return split_first(gate, first, (x, y), m[2:3], None if mf is None else mf[2:3])


@dataclass
class Embedded:
    """What the blocks consume; built by `embed`, sliced by parallel/ for context parallelism."""

    img: Tensor  # [B, L, D]
    txt: Tensor  # [B, S, D] (refined; S trimmed to the longest valid text)
    vec: Tensor  # [B, D]
    vec_first: Tensor | None  # [B, D] for token_replace, else None
    rope: tuple[Tensor, Tensor]  # cos, sin [L, K/2] fp32
    txt_len: Tensor | None  # [B] valid text tokens; None when all S are valid
    grid: tuple[int, int, int]  # token grid (T', H', W') of the whole video
    first: int  # tokens of latent frame 0 among this slice's tokens that use vec_first (0 for T2V)

    @property
    def kv_len(self) -> Tensor | None:
        """Valid tokens of the whole [video | text] sequence per sample (None: all valid)."""
        return None if self.txt_len is None else self.txt_len + self.grid[0] * self.grid[1] * self.grid[2]


def text_lengths(text_mask: Tensor) -> Tensor:
    """Valid tokens per sample [B] of a right-padded mask (ones then zeros, as tokenizers give).

    Upstream reads lengths as row sums; a mask with holes or an empty row would silently
    mean something else (or NaN), so both are rejected.
    """
    lens = text_mask.sum(dim=1, dtype=torch.int64)
    if not torch.compiler.is_compiling():
        prefix = torch.arange(text_mask.shape[1], device=text_mask.device)[None] < lens[:, None]
        if not torch.equal(prefix, text_mask.bool()):
            raise ValueError("text_mask must be right-padded (ones then zeros) in every row")
        if bool((lens == 0).any()):
            raise ValueError(f"text_mask has a row with no valid token (lengths {lens.tolist()})")
    return lens


@dataclass(frozen=True)
class TextLayout:
    """What embed needs from the text lengths, read on the host once (text_layout): with a
    layout given, embed runs without a host sync (a CUDA graph can capture it)."""

    keep: int  # text tokens kept (trimmed to the longest valid text, or all)
    full: bool  # every kept token of every row is valid (no key mask needed)


def text_layout(text_mask: Tensor, *, trim_text: bool = True) -> TextLayout:
    """Validate a right-padded mask [B, S] and read its layout (host syncs)."""
    lens = text_lengths(text_mask)
    keep = int(lens.max()) if trim_text else text_mask.shape[1]
    return TextLayout(keep, bool((lens == keep).all()))


def patchify(x: Tensor, patch: tuple[int, int, int]) -> Tensor:
    """[B, C, T, H, W] -> [B, L, C*pt*ph*pw] in t-h-w token order, features (c, pt, ph, pw) like Conv3d."""
    B, C, T, H, W = x.shape
    pt, ph, pw = patch
    x = x.reshape(B, C, T // pt, pt, H // ph, ph, W // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(B, (T // pt) * (H // ph) * (W // pw), C * pt * ph * pw)


def unpatchify(x_BLF: Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> Tensor:
    """[B, L, C*pt*ph*pw] (c-major features) -> [B, C, T, H, W]."""
    (t, h, w), (pt, ph, pw) = grid, patch
    B = x_BLF.shape[0]
    x = x_BLF.reshape(B, t, h, w, -1, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(B, -1, t * pt, h * ph, w * pw)


def _check_inputs(x: Tensor, t: Tensor, text_states: Tensor, text_mask: Tensor, text_states_2: Tensor,
                  cfg: DiTConfig) -> None:
    if x.dim() != 5 or x.shape[1] != cfg.in_channels:
        raise ValueError(f"x must be [B, {cfg.in_channels}, T, H, W], got {tuple(x.shape)}")
    B, _, T, H, W = x.shape
    if any(n % p for n, p in zip((T, H, W), cfg.patch_size)):
        raise ValueError(f"latent size (T, H, W) = {(T, H, W)} is not divisible by patch_size {cfg.patch_size}")
    expect = {"t": (t, (B,)), "text_states": (text_states, (B, text_states.shape[1], cfg.text_states_dim)),
              "text_mask": (text_mask, (B, text_states.shape[1])), "text_states_2": (text_states_2,
                                                                                     (B, cfg.text_states_dim_2))}
    for name, (v, shape) in expect.items():
        if tuple(v.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(v.shape)}")


def embed(params: Params, x: Tensor, t: Tensor, text_states: Tensor, text_mask: Tensor, text_states_2: Tensor,
          *, cfg: DiTConfig, guidance: Tensor | None = None, attn: AttnFn = sdpa,
          trim_text: bool = True, tokens: tuple[int, int] | None = None, text_multiple: int = 1,
          layout: TextLayout | None = None) -> Embedded:
    """Everything before the blocks. Compute dtype = the params' dtype.

    `tokens` = (start, end) keeps only those video tokens (context parallelism): their
    patches, RoPE rows and frame-0 count. Text and vectors are always whole.
    `text_multiple` pads the text with masked tokens to a multiple (sequence parallelism).
    `layout`: text_layout(text_mask, trim_text=...) read beforehand (sampling reads it once
    per run); None reads it here.
    """
    _check_inputs(x, t, text_states, text_mask, text_states_2, cfg)
    dtype = params["img_in.proj.weight"].dtype
    layout = layout or text_layout(text_mask, trim_text=trim_text)
    # padding never reaches a valid output: drop the padding common to all rows
    text_states, text_mask = text_states[:, :layout.keep], text_mask[:, :layout.keep]
    if pad := -layout.keep % text_multiple:
        text_states, text_mask = F.pad(text_states, (0, 0, 0, pad)), F.pad(text_mask, (0, pad))
    txt_len = None if layout.full and not pad else text_mask.sum(dim=1, dtype=torch.int64)

    def temb(v: Tensor, name: str) -> Tensor:
        feats = ops.timestep_embedding(v, cfg.timestep_freq_dim).to(dtype)
        return ops.mlp_embed(feats, params, f"{name}.mlp.0", f"{name}.mlp.2")

    pooled = ops.mlp_embed(text_states_2.to(dtype), params, "vector_in.in_layer", "vector_in.out_layer")
    vec = temb(t, "time_in") + pooled
    if cfg.guidance_embed:
        if guidance is None:
            raise ValueError("this model has a guidance embedding: pass guidance = scale * 1000, shape [B]")
        vec = vec + temb(guidance, "guidance_in")
    elif guidance is not None:
        raise ValueError("guidance was given but this model has no guidance embedding (guidance_embed=False)")
    vec_first = None
    if cfg.i2v_condition_type == "token_replace":  # frame 0 is clean: t = 0, and no guidance
        vec_first = temb(torch.zeros_like(t), "time_in") + pooled

    txt = token_refiner(params, text_states.to(dtype), t, text_mask, txt_len, cfg=cfg, attn=attn, temb=temb)
    B, C, T, H, W = x.shape
    grid = (T // cfg.patch_size[0], H // cfg.patch_size[1], W // cfg.patch_size[2])
    # Conv3d with kernel == stride is a linear map of each patch: one GEMM, same sum
    start, end = tokens or (0, grid[0] * grid[1] * grid[2])
    img = F.linear(patchify(x.to(dtype), cfg.patch_size)[:, start:end], params["img_in.proj.weight"].flatten(1),
                   params["img_in.proj.bias"])
    cos, sin = ops.rope_freqs(grid, cfg.rope_dim_list, cfg.rope_theta, device=x.device)
    first = min(max(grid[1] * grid[2] - start, 0), end - start) if vec_first is not None else 0
    return Embedded(img, txt, vec, vec_first, (cos[start:end], sin[start:end]), txt_len, grid, first)


def token_refiner(params: Params, text_states: Tensor, t: Tensor, text_mask: Tensor, txt_len: Tensor | None, *,
                  cfg: DiTConfig, attn: AttnFn, temb: Callable[[Tensor, str], Tensor]) -> Tensor:
    """txt_in: condition c = t_embedder(t) + c_embedder(masked mean of the raw states)."""
    m = text_mask.float().unsqueeze(-1)
    mean = ((text_states.float() * m).sum(1) / m.sum(1)).to(text_states.dtype)
    c = temb(t, "txt_in.t_embedder") + ops.mlp_embed(mean, params, "txt_in.c_embedder.linear_1",
                                                     "txt_in.c_embedder.linear_2")
    x = linear(text_states, params, "txt_in.input_embedder")
    for i in range(cfg.text_refiner_depth):
        p = sub(params, f"txt_in.individual_token_refiner.blocks.{i}.")
        x = refiner_block(p, x, c, txt_len, cfg=cfg, attn=attn)
    return x


def final_layer(params: Params, img: Tensor, vec: Tensor) -> Tensor:
    """LayerNorm -> modulate with (shift, scale) -> linear to C*pt*ph*pw features per token."""
    shift, scale = linear(F.silu(vec), params, "final_layer.adaLN_modulation.1").chunk(2, dim=-1)
    return linear(modulate(layer_norm(img, EPS), shift, scale), params, "final_layer.linear")


@dataclass(frozen=True)
class Blocks:
    """The function that runs double / single block i: graphs/ wraps the plain ones with
    parameter gathering, precision casts, recompute and compilation, per block index."""

    double: Callable[[int], Callable[..., tuple[Tensor, Tensor]]] = lambda i: double_block
    single: Callable[[int], Callable[..., Tensor]] = lambda i: single_block


def run_blocks(params: Params, e: Embedded, *, cfg: DiTConfig, attn: AttnFn, tp: TPHooks = NO_TP,
               blocks: Blocks = Blocks(), after_first: Callable[[Tensor], Tensor | None] | None = None) -> Tensor:
    """Double then single blocks; returns this slice's video tokens [B, l, D].

    after_first(img) sees the video tokens after double block 0 (the sampler's first-block
    cache); a tensor it returns is the result and the remaining blocks are skipped."""
    img, txt = e.img, e.txt
    kw = dict(rope=e.rope, kv_len=e.kv_len, cfg=cfg, attn=attn, vec_first=e.vec_first, first=e.first, tp=tp)
    for i in range(cfg.mm_double_blocks_depth):
        img, txt = blocks.double(i)(sub(params, f"double_blocks.{i}."), img, txt, e.vec, **kw)
        if i == 0 and after_first is not None and (out := after_first(img)) is not None:
            return out
    txt_local = tp.split(txt)  # sequence parallel: single blocks split the text too
    h = torch.cat([img, txt_local], dim=1)
    for i in range(cfg.mm_single_blocks_depth):
        h = blocks.single(i)(sub(params, f"single_blocks.{i}."), h, e.vec, n_txt=txt.shape[1], **kw)
    return h[:, : h.shape[1] - txt_local.shape[1]]


def forward(params: Params, x: Tensor, t: Tensor, text_states: Tensor, text_mask: Tensor, text_states_2: Tensor,
            *, cfg: DiTConfig, guidance: Tensor | None = None, attn: AttnFn = sdpa, trim_text: bool = True,
            blocks: Blocks = Blocks()) -> Tensor:
    """Predict the flow velocity (noise - data) for latents x [B, C, T, H, W]; output has x's shape and dtype.

    t: [B] sigma * 1000. text_states [B, S, text_states_dim], text_mask [B, S] (right-padded),
    text_states_2 [B, text_states_dim_2] (CLIP pooled). guidance: [B] scale * 1000 when the
    model has a guidance embedding. Compute runs in the params' dtype.
    """
    e = embed(params, x, t, text_states, text_mask, text_states_2, cfg=cfg, guidance=guidance, attn=attn,
              trim_text=trim_text)
    img = run_blocks(params, e, cfg=cfg, attn=attn, blocks=blocks)
    return unpatchify(final_layer(params, img, e.vec), e.grid, cfg.patch_size).to(x.dtype)
