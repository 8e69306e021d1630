"""
The image side of minigpt-mri: a ViT that turns each image into tokens, a Q-Former that turns those
tokens into a few query tokens in the LLM's width, and the code that loads both from Hugging Face
safetensors checkpoints.

- ViT: Dosovitskiy et al. 2020 ("An Image is Worth 16x16 Words"), one class for the layouts of
  BLIP-2's EVA ViT-g (Fang et al. 2022), OpenAI CLIP (Radford et al. 2021) and SigLIP (Zhai et al.
  2023).
- QFormer: BLIP-2 (Li et al. 2023), as reused by MiniGPT-4 (Zhu et al. 2023).

Loading is strict: an explicit name-mapping table per layout; every missing, unexpected or wrongly
shaped tensor is reported by name in one CheckpointError. Folders that load (Hugging Face layout,
config.json + model.safetensors or sharded model.safetensors.index.json), tested for parity against
`transformers` on tiny random models (layout, config.json model_type: what is read, e.g.):

- BLIP-2 (EVA ViT-g), blip-2: the ViT from vision_model.*, the Q-Former from qformer.*,
  query_tokens and language_projection; e.g. Salesforce/blip2-opt-2.7b, Salesforce/blip2-flan-t5-xl
- CLIP, clip or clip_vision_model: the ViT from vision_model.*; e.g. openai/clip-vit-large-patch14,
  openai/clip-vit-base-patch16
- SigLIP, siglip or siglip_vision_model: the ViT from vision_model.*; e.g.
  google/siglip-base-patch16-224

Everything else in those folders (the OPT/T5 language model, text_model.*, projection heads) is
never read. Original LAVIS .pth checkpoints are not read: convert them to the Hugging Face layout.
Weights load into float32 parameters whatever the stored dtype.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from config import CheckpointError  # kept importable as vision.CheckpointError

# -----------------------------------------------------------------------------
# configs


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    class_token: bool = True
    act: str = "gelu"  # "gelu" (EVA), "quick_gelu" (OpenAI CLIP), "gelu_tanh" (SigLIP)
    pre_norm: bool = False  # CLIP's `pre_layrnorm` after the embeddings
    final_norm: bool = True  # LayerNorm over all output tokens (BLIP-2, SigLIP; not CLIP, see ViT)
    norm_eps: float = 1e-6
    channels: int = 3
    patch_bias: bool = True  # CLIP's patch embedding has no bias
    # "patch": one conv of stride patch_size (every pretrained layout); "cnn", "conv": see ConvStem
    stem: str = "patch"
    stem_stride: int = 1  # the "conv" stem's first conv: 2 halves at once (see ConvStem)
    stem_channels: int = 16  # the "conv" stem's first conv's channels

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class QFormerConfig:
    num_query: int = 32
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    cross_every: int = 2  # cross-attention in layers 0, k, 2k, ... (cross_attention_frequency)
    vision_width: int = 1408
    out_dim: int = 4096
    norm_eps: float = 1e-12
    act: str = "gelu"
    # each query starts with its region of the image grid, average-pooled (QFormer.pool_regions)
    pooled_queries: bool = False


# -----------------------------------------------------------------------------
# building blocks

ACTS = {
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP's cheap GELU approximation
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        if act not in ACTS:
            raise ValueError(f"unknown activation {act!r}; expected one of {sorted(ACTS)}")
        self.fc1, self.fc2, self.act = nn.Linear(dim, hidden), nn.Linear(hidden, dim), ACTS[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head attention; with `kv_dim` it is cross-attention (queries from x, keys/values from
    ctx).

    One layout for every checkpoint: self-attention has one fused `qkv` Linear with a bias (EVA is
    stored fused; CLIP/SigLIP's q/k/v are concatenated at load time), cross-attention a `q` and
    a fused `kv`.
    """

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        assert dim % heads == 0, f"width {dim} not divisible by {heads} heads"
        self.heads = heads
        if kv_dim is None:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q, self.kv = nn.Linear(dim, dim), nn.Linear(kv_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, ctx=None):
        B, T, C = x.shape
        if ctx is None:
            q, k, v = self.qkv(x).split(C, dim=-1)
        else:
            q, (k, v) = self.q(x), self.kv(ctx).split(C, dim=-1)
        nh, hs = self.heads, C // self.heads
        q, k, v = (t.view(B, -1, nh, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # no mask: every token sees every token
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-norm transformer block (ViT)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = Attention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.width, cfg.mlp_dim, cfg.act)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int], class_token: bool) -> torch.Tensor:
    """(1, [1 +] g*g, D) learned position embeddings of a square g x g grid -> the new (gh, gw)
    grid, bicubic, as Hugging Face's `interpolate_pos_encoding` does; the class token's entry is
    kept."""
    cls, patch = (pos[:, :1], pos[:, 1:]) if class_token else (pos[:, :0], pos)
    g, D = math.isqrt(patch.shape[1]), patch.shape[2]
    assert g * g == patch.shape[1], f"position grid of {patch.shape[1]} entries is not square"
    if (g, g) == tuple(grid):
        return pos
    patch = patch.reshape(1, g, g, D).permute(0, 3, 1, 2)  # (1, D, g, g)
    patch = F.interpolate(patch.float(), size=grid, mode="bicubic", align_corners=False)
    patch = patch.to(pos.dtype)
    return torch.cat([cls, patch.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], D)], dim=1)


# -----------------------------------------------------------------------------
# ViT


def sincos_2d(grid: int, dim: int):
    """(grid*grid, dim) fixed 2-D position code: half the channels encode the row, half the column,
    each as sines and cosines of geometrically spaced frequencies (Vaswani et al. 2017, by axis)."""
    assert dim % 4 == 0, "2-D sine-cosine positions need a width divisible by 4"
    freq = 1.0 / 10000 ** (torch.arange(dim // 4) / (dim // 4))  # (dim/4,)
    pos = torch.arange(grid, dtype=torch.float32)
    ang = pos[:, None] * freq[None]  # (grid, dim/4)
    axis = torch.cat([ang.sin(), ang.cos()], 1)  # (grid, dim/2)
    rows = axis[:, None, :].expand(grid, grid, -1)  # row code, the same along a row
    cols = axis[None, :, :].expand(grid, grid, -1)
    return torch.cat([rows, cols], -1).reshape(grid * grid, dim)


class ConvStem(nn.Sequential):
    """A convolutional patch embedding for training from scratch on few images: the "hybrid" ViT of
    Dosovitskiy et al. 2020, whose tokens are a CNN's feature map. Per halving of the resolution
    (log2 patch_size of them) two 3x3 convs with BatchNorm and ReLU, then 2x2 max-pooling, channels
    doubling up to width/2 (VGG-style, the blocks of a plain CNN box regressor); then a 1x1 conv to
    the width. `light` has one 3x3 conv of first_channels (16) at full resolution, then one 3x3
    stride-2 conv per halving (Xiao et al. 2021, "Early Convolutions Help Transformers See
    Better"), each with BatchNorm and ReLU, channels 32, 64, ... up to the width: past the first
    layer it halves before it convolves, so its other layers run on few pixels and many channels,
    where a CPU's convolutions are fast (the full-resolution layer takes about half of its time).
    With first_stride 2 that first conv halves the image at once, and no layer runs at full
    resolution: at the same image size, one layer fewer, each on a quarter of the pixels (the CPU
    recipe, with 32 first channels to keep what the halving drops); at twice the side, the same
    grids as first_stride 1. The same token grid as a patch embedding."""

    def __init__(self, channels: int, width: int, patch_size: int, light: bool = False,
                 first_stride: int = 1, first_channels: int = 16):
        n = int(math.log2(patch_size))
        if 2**n != patch_size or n < 1:
            raise ValueError(f"a conv stem needs a power-of-two patch size, got {patch_size}")
        if first_stride not in (1, 2) or (first_stride == 2 and not light):
            raise ValueError(f"first_stride {first_stride}: 1, or 2 with the light stem")
        if first_channels != 16 and not light:
            raise ValueError(f"first_channels {first_channels}: 16, or another with the light stem")
        layers = []
        if light:  # C -> c at full resolution (or half), then 32, 64, ..., at most the width
            c = first_channels
            layers += [nn.Conv2d(channels, c, 3, stride=first_stride, padding=1, bias=False),
                       nn.BatchNorm2d(c), nn.ReLU()]
            halvings_left = n if first_stride == 1 else n - 1  # a stride-2 first conv did one
            chans = [c] + [min(32 << i, width) for i in range(halvings_left)]
        else:  # C, ..., width/2
            chans = [channels] + [max(width >> (n - i), 16) for i in range(n)]
        for a, b in zip(chans[:-1], chans[1:]):
            if light:
                layers += [nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(b),
                           nn.ReLU()]
            else:
                layers += [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(),
                           nn.Conv2d(b, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(),
                           nn.MaxPool2d(2)]
        super().__init__(*layers, nn.Conv2d(chans[-1], width, 1))

    def forward(self, x):
        """x (B, C, H, W) -> (B, width, H / patch, W / patch), channels-last inside: the CPU's
        oneDNN convolutions, BatchNorm and pooling run faster on it (a training step of the CPU
        recipe with the heavy stem took 11% less time, bench.py --recipe)."""
        return super().forward(x.contiguous(memory_format=torch.channels_last))

    def flops(self, image_size: int) -> list[int]:
        """Forward FLOPs of each conv for one image: 2 per multiply-add; BatchNorm, ReLU and pooling
        not counted."""
        side, out = image_size, []
        for m in self:
            if isinstance(m, nn.Conv2d):
                side //= m.stride[0]
                kh, kw = m.kernel_size
                out.append(2 * side * side * m.in_channels * m.out_channels * kh * kw)
            elif isinstance(m, nn.MaxPool2d):
                side //= 2
        return out


class ViT(nn.Module):
    """Vision transformer; returns all tokens (B, [1 +] grid*grid, width), class token first if any.

    The output equals Hugging Face's `last_hidden_state`: for BLIP-2 (and SigLIP) that includes
    `post_layernorm` over all tokens (final_norm=True); CLIP applies its `post_layernorm` only to
    the pooled class token, so for CLIP we return the un-normed tokens and do not load that norm.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        C, D = cfg.channels, cfg.width
        if cfg.stem not in ("patch", "conv", "cnn"):
            raise ValueError(f"stem must be 'patch', 'conv' or 'cnn', got {cfg.stem!r}")
        if cfg.stem != "patch":
            self.patch_embed = ConvStem(C, D, cfg.patch_size, light=cfg.stem == "conv",
                                        first_stride=cfg.stem_stride,
                                        first_channels=cfg.stem_channels)
        else:
            p = cfg.patch_size
            self.patch_embed = nn.Conv2d(C, D, p, stride=p, bias=cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, int(cfg.class_token) + cfg.grid**2, D))
        self.norm_pre = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.pre_norm else None
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.final_norm else None
        self.init_weights()

    def init_weights(self):
        """From-scratch init: Linear/conv weights and the class token N(0, 0.02), biases 0,
        LayerNorms 1/0; position embeddings start as 2-D sine-cosine (MAE, He et al. 2021), so every
        patch knows where it is from the first step (they still train). The conv stem keeps
        PyTorch's default (fan-in scaled) init: std 0.02 over stacked small convs would shrink the
        signal at every layer."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and self.cfg.stem != "patch":
                continue
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.cfg.stem == "patch":  # LeCun normal: unit-scale patches beside unit-scale positions
            w = self.patch_embed.weight
            nn.init.trunc_normal_(w, std=w[0].numel() ** -0.5)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        with torch.no_grad():
            self.pos_embed.zero_()
            first = int(self.cls_token is not None)  # the class token keeps zeros
            self.pos_embed[0, first:] = sincos_2d(self.cfg.grid, self.cfg.width)

    def stem_flops(self) -> list[int]:
        """Forward FLOPs of the patch embedding's convs, in order, for one image at image_size."""
        c = self.cfg
        if c.stem == "patch":
            return [2 * c.grid ** 2 * c.channels * c.patch_size ** 2 * c.width]
        return self.patch_embed.flops(c.image_size)

    def flops(self) -> int:
        """Forward FLOPs of the transformer blocks for one image at cfg.image_size (the patch
        embedding's are stem_flops): 2 per multiply-add of every matmul, attention over the full
        T x T square (as LLaMA.attention_flops)."""
        c = self.cfg
        T = c.grid ** 2 + int(c.class_token)  # tokens per image
        matmuls = 2 * T * (4 * c.width ** 2 + 2 * c.width * c.mlp_dim)  # qkv, out, MLP
        attention = 4 * T ** 2 * c.width  # scores and weighted values
        return c.depth * (matmuls + attention)

    def forward(self, x):
        B, _, H, W = x.shape
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, gh*gw, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1 + gh*gw, D)
        # another image size than built for: interpolate on the fly (static for a fixed input size)
        x = x + resize_pos_embed(self.pos_embed, (H // p, W // p), self.cls_token is not None)
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) if self.norm is not None else x

    @classmethod
    def from_pretrained(cls, folder, image_size: int | None = None) -> "ViT":
        """Load the vision tower of a BLIP-2, CLIP or SigLIP checkpoint folder (config.json and
        safetensors). With image_size, position embeddings are resized (bicubic) to its grid."""
        folder = Path(folder)
        layout, vcfg = vision_layout(folder)
        cfg = vit_config_from_hf(layout, vcfg)
        index = safetensors_index(folder)
        # whole models and CLIPVisionModel keep the tower under `vision_model.`, a tower saved
        # alone may not
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in index) else ""
        ckpt_size = cfg.image_size
        if image_size is not None:
            cfg.image_size = image_size
        model = cls(cfg)
        ckpt_grid = ckpt_size // cfg.patch_size
        mapping, transforms = vit_mapping(cfg, layout, prefix, ckpt_grid=ckpt_grid)
        ignore = VIT_IGNORE[layout]
        keys = [k for k in index if k.startswith(prefix) and not _ignored(k[len(prefix):], ignore)]
        tensors = load_safetensors(folder, set(keys))
        load_mapped(model, tensors, mapping, transforms, source=str(folder))
        return model


# -----------------------------------------------------------------------------
# Q-Former


class QFormerLayer(nn.Module):
    """BERT-style post-norm layer on the query tokens: self-attention, cross-attention to the image
    tokens (only in some layers), feed-forward; each sub-layer is x = LayerNorm(x + f(x))."""

    def __init__(self, cfg: QFormerConfig, cross: bool):
        super().__init__()
        D = cfg.width
        self.attn, self.norm1 = Attention(D, cfg.heads), nn.LayerNorm(D, eps=cfg.norm_eps)
        self.cross = Attention(D, cfg.heads, kv_dim=cfg.vision_width) if cross else None
        self.norm2 = nn.LayerNorm(D, eps=cfg.norm_eps) if cross else None
        self.mlp, self.norm3 = MLP(D, cfg.mlp_dim, cfg.act), nn.LayerNorm(D, eps=cfg.norm_eps)

    def forward(self, x, img):
        x = self.norm1(x + self.attn(x))
        if self.cross is not None:
            x = self.norm2(x + self.cross(x, img))
        return self.norm3(x + self.mlp(x))


class QFormer(nn.Module):
    """Learned queries read the image tokens by cross-attention; a Linear maps them to LLM width."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.query = nn.Parameter(torch.zeros(1, cfg.num_query, cfg.width))
        self.norm_in = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)  # BLIP-2 normalises queries first
        cross = [i % cfg.cross_every == 0 for i in range(cfg.depth)]
        self.layers = nn.ModuleList([QFormerLayer(cfg, c) for c in cross])
        self.proj = nn.Linear(cfg.width, cfg.out_dim)
        self.pool_proj = nn.Linear(cfg.vision_width, cfg.width) if cfg.pooled_queries else None
        self.init_weights()

    def init_weights(self):
        """From-scratch init: queries N(0, 0.02); Linear layers PyTorch's default,
        U(+-1/sqrt(fan_in)), which scales with the width. BERT's fixed std 0.02 suits width 768; at
        small widths it makes the cross-attention's output tiny next to the queries in these
        post-norm layers: the image barely reaches the output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
        nn.init.trunc_normal_(self.query, std=0.02)

    def forward_features(self, img):
        """img (B, T, vision_width) -> (B, num_query, width), before `proj`: Hugging Face's
        last_hidden_state."""
        if img.shape[-1] != self.cfg.vision_width:
            raise ValueError(f"image tokens have width {img.shape[-1]}, "
                             f"the Q-Former expects {self.cfg.vision_width}")
        x = self.query.expand(img.shape[0], -1, -1)  # (B, Q, width)
        if self.pool_proj is not None:
            x = x + self.pool_proj(self.pool_regions(img))
        x = self.norm_in(x)
        for layer in self.layers:
            x = layer(x, img)
        return x

    def forward(self, img):
        return self.proj(self.forward_features(img))  # (B, Q, out_dim)

    def flops(self, keys: int) -> dict[str, int]:
        """Forward FLOPs of one pass over `keys` image tokens, by part, since the parts' backward
        costs differ (see MiniGPT.flops_per_sample): "layers" (self-attention, MLPs,
        cross-attention's q and out projections and attention), "kv" (cross-attention's keys and
        values of the image tokens), "pooled" (pool_proj) and "proj" (to the LLM's width). 2 per
        multiply-add, pooling not counted."""
        c, Q = self.cfg, self.cfg.num_query
        n_cross = len(range(0, c.depth, c.cross_every))
        layer = 2 * Q * (4 * c.width ** 2 + 2 * c.width * c.mlp_dim) + 4 * Q * Q * c.width
        cross = 2 * Q * 2 * c.width ** 2 + 4 * Q * keys * c.width
        return dict(layers=c.depth * layer + n_cross * cross,
                    kv=n_cross * 2 * keys * 2 * c.vision_width * c.width,
                    pooled=2 * Q * c.vision_width * c.width if c.pooled_queries else 0,
                    proj=2 * Q * c.width * c.out_dim)

    def pool_regions(self, img):
        """img (B, [1 +] g*g, W) ViT tokens -> (B, Q, W): the g x g grid average-pooled to Q = qh x
        qw regions (qh the largest divisor of Q up to its square root), in row-major order.

        With pooled_queries, query k starts as its learned vector plus its region's pooled tokens: a
        locality-preserving projector (Cha et al. 2024, Honeybee's C-Abstractor, pools the same
        way). Plain learned queries first attend almost uniformly, so every query reads about the
        image's mean; a pooled query carries its region's content and place from the first step.
        (Alone it did not lift the from-scratch recipe off the mean box; with the CNN stem and the
        patch loss it helped on one set and tied on another: docs/results.md.)"""
        B, T, W = img.shape
        g = math.isqrt(T)
        if g * g != T:  # a class token first
            img, g = img[:, 1:], math.isqrt(T - 1)
        if g * g != img.shape[1]:
            raise ValueError(f"pooled queries need a square grid of image tokens, got {T}")
        Q = self.cfg.num_query
        qh = max(d for d in range(1, math.isqrt(Q) + 1) if Q % d == 0)
        grid = img.transpose(1, 2).reshape(B, W, g, g)  # (B, W, g, g)
        return F.adaptive_avg_pool2d(grid, (qh, Q // qh)).flatten(2).transpose(1, 2)  # (B, Q, W)

    @classmethod
    def from_pretrained(cls, folder, out_dim: int) -> "QFormer":
        """Load `query_tokens` and `qformer.*` of a BLIP-2 folder. `proj` takes
        `language_projection` when its shape fits out_dim, else keeps its fresh init (MiniGPT-4
        trains its own)."""
        folder = Path(folder)
        layout, _ = vision_layout(folder)
        if layout != "blip2":
            raise CheckpointError(f"{folder}: a Q-Former loads only from a BLIP-2 checkpoint, "
                                  f"this one is {layout}")
        hf = _read_config(folder)
        q = hf.get("qformer_config") or {}
        cfg = QFormerConfig(
            num_query=hf.get("num_query_tokens", 32),
            width=q.get("hidden_size", 768),
            depth=q.get("num_hidden_layers", 12),
            heads=q.get("num_attention_heads", 12),
            mlp_dim=q.get("intermediate_size", 3072),
            cross_every=q.get("cross_attention_frequency", 2),
            vision_width=q.get("encoder_hidden_size", 1408),
            out_dim=out_dim,
            norm_eps=q.get("layer_norm_eps", 1e-12),
            act=q.get("hidden_act", "gelu"),
        )
        model = cls(cfg)
        mapping, transforms = qformer_mapping(cfg)
        index = safetensors_index(folder)
        lp = "language_projection.weight"
        if lp in index and _shape(index, lp) == (out_dim, cfg.width):
            mapping |= {"proj.weight": lp, "proj.bias": "language_projection.bias"}
        else:
            mapping |= {"proj.weight": None, "proj.bias": None}  # keep the fresh init
        ours = [k for k in index if k == "query_tokens" or k.startswith("qformer.")]
        keys = [k for k in ours if not _ignored(k, QFORMER_IGNORE)]
        keys += [k for k in mapping.values()
                 if isinstance(k, str) and k.startswith("language_projection.")]
        tensors = load_safetensors(folder, set(keys))
        load_mapped(model, tensors, mapping, transforms, source=str(folder))
        return model


# -----------------------------------------------------------------------------
# reading checkpoints


def safetensors_index(folder) -> dict[str, Path]:
    """Every tensor name in a folder -> the file holding it: `model.safetensors`, or the shards
    listed in `model.safetensors.index.json` (Hugging Face's layout for large models)."""
    folder = Path(folder)
    index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: folder / f for k, f in weight_map.items()}
    if single.exists():
        with safe_open(str(single), "pt") as f:
            return {k: single for k in f.keys()}
    found = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else "no such folder"
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                          f"(found: {found})")


def load_safetensors(folder, wanted: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Read the tensors named in `wanted` (all when None) from one file or many shards. Files are
    opened lazily and only the wanted tensors are read; names the folder lacks are left out (see
    load_mapped)."""
    index = safetensors_index(folder)
    by_file: dict[Path, list[str]] = {}
    for k, f in index.items():
        if wanted is None or k in wanted:
            by_file.setdefault(f, []).append(k)
    out = {}
    for f, keys in by_file.items():
        if not f.exists():
            raise CheckpointError(f"{f}: shard listed in model.safetensors.index.json is missing")
        with safe_open(str(f), "pt") as sf:
            for k in keys:
                out[k] = sf.get_tensor(k)
    return out


def load_mapped(module: nn.Module, tensors: dict, mapping: dict, transforms: dict | None = None,
                source="checkpoint"):
    """Copy checkpoint tensors into `module` by an explicit table.

    mapping: our parameter name -> checkpoint name, a tuple of names (concatenated on dim 0 unless a
    transform says otherwise), or None (keep our init). transforms: our name -> f(*ckpt tensors) ->
    tensor. Every tensor in `tensors` must be used. All missing, unexpected and wrongly shaped
    tensors are collected and raised together in one CheckpointError naming each.
    """
    transforms = transforms or {}
    params = module.state_dict()
    stale = sorted(set(mapping) ^ set(params))
    assert not stale, f"mapping table out of date: {stale}"
    missing, shapes, used = [], [], set()
    with torch.no_grad():
        for ours, theirs in mapping.items():
            if theirs is None:
                continue
            names = (theirs,) if isinstance(theirs, str) else tuple(theirs)
            used.update(names)
            absent = [n for n in names if n not in tensors]
            if absent:
                missing += absent
                continue
            src = [tensors[n] for n in names]
            same = (lambda *t: t[0]) if len(src) == 1 else (lambda *t: torch.cat(t, dim=0))
            fn = transforms.get(ours, same)
            try:
                value = fn(*src)
            except RuntimeError:  # e.g. a reshape of a tensor of the wrong size
                value = None
            if value is None or value.shape != params[ours].shape:
                got = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, src))
                shapes.append(f"{got} -> {ours} expects {tuple(params[ours].shape)}")
                continue
            params[ours].copy_(value)  # state_dict shares the parameters' storage; casts the dtype
    unexpected = sorted(set(tensors) - used)
    if missing or shapes or unexpected:
        lines = [f"{source}: checkpoint does not match {type(module).__name__}"]
        lines += [f"  missing tensor: {n}" for n in missing]
        lines += [f"  wrongly shaped tensor: {s}" for s in shapes]
        lines += [f"  unexpected tensor: {n}" for n in unexpected]
        raise CheckpointError("\n".join(lines))


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path}: not found; expected a Hugging Face checkpoint folder")
    return json.loads(path.read_text())


def _shape(index: dict, key: str) -> tuple:
    with safe_open(str(index[key]), "pt") as f:
        return tuple(f.get_slice(key).get_shape())


def _ignored(key: str, patterns: tuple[str, ...]) -> bool:
    # "*" stands for one dotted part (a layer number); a pattern ending in "." matches everything
    # below it
    rx = (re.escape(p).replace(r"\*", r"[^.]+") + (".*" if p.endswith(".") else "")
          for p in patterns)
    return any(re.fullmatch(r, key) for r in rx)


# -----------------------------------------------------------------------------
# checkpoint layouts and their mapping tables

# model_type (or architecture) of config.json -> our layout name
LAYOUTS = {
    "blip-2": "blip2", "blip_2": "blip2", "blip_2_vision_model": "blip2",
    "clip": "clip", "clip_vision_model": "clip",
    "siglip": "siglip", "siglip_vision_model": "siglip",
}
ARCHITECTURES = {"Blip2": "blip2", "CLIP": "clip", "Siglip": "siglip"}
# tensors under the vision prefix we knowingly skip, with the reason
VIT_IGNORE = {
    "blip2": (),
    # post_layernorm: CLIP applies it to the pooled token only; position_ids: a buffer older files
    # stored
    "clip": ("post_layernorm.", "embeddings.position_ids"),
    # head: the attention-pooling head of the contrastive loss
    "siglip": ("head.", "embeddings.position_ids"),
}
# text-side Q-Former tensors (ITM checkpoints, BERT embeddings) that queries never use
QFORMER_IGNORE = ("qformer.embeddings.", "qformer.encoder.layer.*.intermediate.",
                  "qformer.encoder.layer.*.output.")


def vision_layout(folder: Path) -> tuple[str, dict]:
    """Tell a BLIP-2, CLIP or SigLIP folder apart by config.json -> (layout, vision config dict)."""
    hf = _read_config(folder)
    mt = hf.get("model_type", "")
    archs = hf.get("architectures") or []
    layout = LAYOUTS.get(mt)
    for a in archs if layout is None else ():  # an old config without model_type: architectures
        layout = layout or next((v for k, v in ARCHITECTURES.items() if a.startswith(k)), None)
    if layout is None:
        raise CheckpointError(
            f"{folder}: model_type {mt!r} (architectures {archs}) is not a vision checkpoint this "
            "loader reads; expected a BLIP-2 ('blip-2'), CLIP ('clip') or SigLIP ('siglip') folder"
        )
    # a vision tower saved alone: config.json is the vision config
    standalone = mt.endswith("_vision_model")
    return layout, hf if standalone else hf.get("vision_config") or {}


def vit_config_from_hf(layout: str, v: dict) -> ViTConfig:
    # defaults are Hugging Face's for each model type, for configs that leave them out
    d = {"blip2": (224, 14, 1408, 39, 16, 6144, "gelu", 1e-6),
         "clip": (224, 32, 768, 12, 12, 3072, "quick_gelu", 1e-5),
         "siglip": (224, 16, 768, 12, 12, 3072, "gelu_pytorch_tanh", 1e-6)}[layout]
    act = v.get("hidden_act", d[6])
    act = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}.get(act, act)
    if act not in ACTS:
        raise CheckpointError(f"vision_config.hidden_act {act!r} is not supported "
                              f"(supported: {sorted(ACTS)})")
    if layout == "blip2" and not v.get("qkv_bias", True):
        raise CheckpointError("vision_config.qkv_bias = false is not supported "
                              "(EVA ViT-g has q and v biases)")
    return ViTConfig(
        image_size=v.get("image_size", d[0]), patch_size=v.get("patch_size", d[1]),
        width=v.get("hidden_size", d[2]),
        depth=v.get("num_hidden_layers", d[3]), heads=v.get("num_attention_heads", d[4]),
        mlp_dim=v.get("intermediate_size", d[5]), act=act, norm_eps=v.get("layer_norm_eps", d[7]),
        channels=v.get("num_channels", 3),
        class_token=layout != "siglip", pre_norm=layout == "clip", final_norm=layout != "clip",
        patch_bias=layout != "clip",
    )


def vit_mapping(cfg: ViTConfig, layout: str, prefix: str, ckpt_grid: int):
    """Our ViT's names -> Hugging Face names, and the transforms between them:
    - class/position embeddings: BLIP-2 stores (1, 1, D) / (1, T, D) Parameters, CLIP/SigLIP a
      (D,) vector and an nn.Embedding (T, D); all become (1, ., D), and positions are resized to
      our grid.
    - attention: BLIP-2's qkv is already fused as ours (its bias holds q, zeros for k, v);
      CLIP/SigLIP store q_proj/k_proj/v_proj, concatenated on the output dimension.
    """
    P, D = prefix, cfg.width
    e = P + "embeddings."
    m = {"patch_embed.weight": e + "patch_embedding.weight"}
    if cfg.patch_bias:
        m["patch_embed.bias"] = e + "patch_embedding.bias"
    ckpt_T = int(cfg.class_token) + ckpt_grid**2

    def pos(p):  # a grid other than config.json's is a shape error (None), not a silent resize
        if p.numel() != ckpt_T * D:
            return None
        return resize_pos_embed(p.reshape(1, -1, D), (cfg.grid, cfg.grid), cfg.class_token)

    t = {"pos_embed": pos}
    if layout == "blip2":
        m |= {"cls_token": e + "class_embedding", "pos_embed": e + "position_embedding"}
    else:
        m["pos_embed"] = e + "position_embedding.weight"
        if cfg.class_token:
            m["cls_token"] = e + "class_embedding"
            t["cls_token"] = lambda c: c.reshape(1, 1, D)
    if cfg.pre_norm:
        m |= {"norm_pre.weight": P + "pre_layrnorm.weight",  # [sic]
              "norm_pre.bias": P + "pre_layrnorm.bias"}
    if cfg.final_norm:
        m |= {"norm.weight": P + "post_layernorm.weight", "norm.bias": P + "post_layernorm.bias"}
    for i in range(cfg.depth):
        b, h = f"blocks.{i}.", f"{P}encoder.layers.{i}."
        for wb in ("weight", "bias"):
            m |= {
                b + f"norm1.{wb}": h + f"layer_norm1.{wb}",
                b + f"norm2.{wb}": h + f"layer_norm2.{wb}",
                b + f"mlp.fc1.{wb}": h + f"mlp.fc1.{wb}",
                b + f"mlp.fc2.{wb}": h + f"mlp.fc2.{wb}",
            }
            if layout == "blip2":
                m[b + f"attn.qkv.{wb}"] = h + f"self_attn.qkv.{wb}"
                m[b + f"attn.proj.{wb}"] = h + f"self_attn.projection.{wb}"
            else:
                m[b + f"attn.qkv.{wb}"] = tuple(h + f"self_attn.{x}_proj.{wb}" for x in "qkv")
                m[b + f"attn.proj.{wb}"] = h + f"self_attn.out_proj.{wb}"
    return m, t


def qformer_mapping(cfg: QFormerConfig):
    """Our Q-Former's names -> BLIP-2's (`qformer.*`, a BERT encoder). BERT keeps query/key/value
    apart; we fuse self-attention's into `qkv` and cross-attention's key/value into `kv`
    (concatenated on dim 0). The query feed-forward is BLIP-2's `intermediate_query`/`output_query`;
    the text one is skipped."""
    m = {"query": "query_tokens"}
    m |= {"norm_in.weight": "qformer.layernorm.weight", "norm_in.bias": "qformer.layernorm.bias"}
    for i in range(cfg.depth):
        o, h = f"layers.{i}.", f"qformer.encoder.layer.{i}."
        for wb in ("weight", "bias"):
            a = h + "attention."
            qkv = ("query", "key", "value")
            m[o + f"attn.qkv.{wb}"] = tuple(a + f"attention.{x}.{wb}" for x in qkv)
            m[o + f"attn.proj.{wb}"] = a + f"output.dense.{wb}"
            m[o + f"norm1.{wb}"] = a + f"output.LayerNorm.{wb}"
            if i % cfg.cross_every == 0:
                c = h + "crossattention."
                m[o + f"cross.q.{wb}"] = c + f"attention.query.{wb}"
                m[o + f"cross.kv.{wb}"] = (c + f"attention.key.{wb}", c + f"attention.value.{wb}")
                m[o + f"cross.proj.{wb}"] = c + f"output.dense.{wb}"
                m[o + f"norm2.{wb}"] = c + f"output.LayerNorm.{wb}"
            m[o + f"mlp.fc1.{wb}"] = h + f"intermediate_query.dense.{wb}"
            m[o + f"mlp.fc2.{wb}"] = h + f"output_query.dense.{wb}"
            m[o + f"norm3.{wb}"] = h + f"output_query.LayerNorm.{wb}"
    return m, {}
