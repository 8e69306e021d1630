"""
The language side and the whole model.

1. LLaMA: a LLaMA-style decoder (RMSNorm, half-split rotary embeddings, SwiGLU, grouped-query
   attention, optional tied head, static KV cache), loadable from Hugging Face `LlamaForCausalLM`
   safetensors (TinyLlama-1.1B, Llama-2-7B, Vicuna-7B, ...).
2. MiniGPT: ViT -> Q-Former -> image embeddings spliced into a fixed prompt -> LLaMA, trained with
   cross-entropy on the answer tokens only, answering with box-constrained greedy decoding.

References: MiniGPT-4 (Zhu et al. 2023), gpt-fast (static KV cache), nanoGPT (layout).
"""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from config import CheckpointError
from vision import (QFormer, QFormerConfig, ViT, ViTConfig, load_mapped, load_safetensors,
                    safetensors_index)

# -----------------------------------------------------------------------------
# LLaMA


@dataclass
class LLaMAConfig:
    vocab_size: int = 512
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    # grouped-query attention: each kv head serves n_heads // n_kv_heads q heads
    n_kv_heads: int = 4
    hidden_dim: int = 688  # SwiGLU width
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False

    @staticmethod
    def swiglu_hidden(dim: int, multiple: int = 32) -> int:
        """The SwiGLU width of a from-scratch LLM: the next multiple of 32 above 8/3 of dim (LLaMA:
        the parameters of a 4x GELU MLP in three matrices)."""
        return int(8 / 3 * dim / multiple + 1) * multiple

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 (as the reference does), scale in the input dtype
        x32 = x.float()
        return ((x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
                * self.weight)


def rope_cos_sin(input_pos, head_dim: int, theta: float):
    """cos, sin (T, head_dim) for positions input_pos (T,), in the half-split layout: frequency k
    sits at columns k and k + head_dim/2, which is how Hugging Face stores LLaMA's q/k weights (its
    conversion script permuted Meta's interleaved pairs), so they load unpermuted."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=input_pos.device).float()
                               / head_dim)
    angles = input_pos.float()[:, None] * inv_freq[None, :]  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # x (B, nh, T, hd); rotate_half maps [a, b] -> [-b, a]
    a, b = x.chunk(2, dim=-1)
    rotated = torch.cat([-b, a], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache(nn.Module):
    """Static KV cache (gpt-fast): fixed-size buffers written in place at input_pos, so every decode
    step has the same shapes and torch.compile / CUDA graphs can capture it."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        # k, v (B, n_kv, T, hd) written at positions input_pos (T,)
        self.k[:, :, input_pos] = k.to(self.k.dtype)
        self.v[:, :, input_pos] = v.to(self.v.dtype)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: LLaMAConfig):
        super().__init__()
        assert cfg.dim % cfg.n_heads == 0 and cfg.n_heads % cfg.n_kv_heads == 0
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, cache_pos, mask):
        # cache_pos (T,): where this call's keys and values go in the KV cache; None when not
        # caching
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_pos is not None:  # keep this call's keys and values
            k_all, v_all = self.kv_cache.update(cache_pos, k, v)  # (B, nkv, max_len, hd)
            if mask is not None:  # a decode step: attend over the whole static cache, masked
                k, v = k_all, v_all
        # grouped-query: query head h reads kv head h // (n_heads / n_kv_heads), as Hugging Face's
        # repeat_kv, but without copying the keys and values
        gqa = self.n_heads != self.n_kv_heads
        # training, or the prefill: its own keys only, causal (flash attention's fast path)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: LLaMAConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: LLaMAConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x, cos, sin, cache_pos, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache_pos, mask)
        return x + self.ffn(self.ffn_norm(x))


# our parameter name -> Hugging Face LlamaForCausalLM name ({i}: layer index)
LLAMA_HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "layers.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attn.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attn.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attn.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attn.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.ffn.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.ffn.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.ffn.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def llama_mapping(n_layers: int) -> dict:
    """LLAMA_HF_NAMES with {i} expanded for every layer: our parameter name -> the checkpoint's."""
    return {ours.format(i=i): theirs.format(i=i) for ours, theirs in LLAMA_HF_NAMES.items()
            for i in (range(n_layers) if "{i}" in ours else [None])}


class LLaMA(nn.Module):
    """LLaMA-style decoder. forward takes embeddings (so image embeddings can be spliced in) and
    returns the final-normed hidden states; logits(h) applies the head only where it is needed."""

    def __init__(self, cfg: LLaMAConfig):
        super().__init__()
        self.config = cfg
        # activation checkpointing per block while training (large shapes)
        self.grad_checkpoint = False
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.causal_mask: torch.Tensor | None = None
        self.init_weights()

    def init_weights(self):
        """From-scratch init (GPT-2 / nanoGPT, width-scaled): N(0, 1/sqrt(dim)) for embeddings and
        linears, the two projections that write into the residual stream scaled by
        1/sqrt(2 * n_layers), norms at 1. GPT-2's fixed 0.02 is ~0.55/sqrt(dim) at 768; at small
        widths it would shrink the path from the image slots to the answer."""
        std = self.config.dim ** -0.5
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def setup_cache(self, batch: int, max_len: int, dtype=None, device=None):
        """Allocate (or re-allocate) the static KV cache for `batch` sequences of up to max_len."""
        cfg = self.config
        if max_len > cfg.max_seq_len:
            raise ValueError(f"sequence of {max_len} tokens exceeds the model's max_seq_len "
                             f"{cfg.max_seq_len}")
        dtype = dtype or self.tok_embeddings.weight.dtype
        device = device or self.tok_embeddings.weight.device
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(batch, cfg.n_kv_heads, max_len, cfg.head_dim, dtype,
                                          device)
        self.causal_mask = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool, device=device))

    def forward(self, x, input_pos, use_cache: bool = False):
        # x (B, T, dim) embeddings, input_pos (T,) long positions -> (B, T, dim) hidden after final
        # norm
        cos, sin = rope_cos_sin(input_pos, self.config.head_dim, self.config.rope_theta)  # (T, hd)
        mask, cache_pos = None, input_pos if use_cache else None
        if use_cache:
            assert self.causal_mask is not None, "call setup_cache() first"
            # A call of several tokens is the prefill, at positions 0..T-1 of an empty cache: plain
            # causal attention over its own keys (is_causal, no mask over the whole cache). One
            # token: a decode step.
            if x.shape[1] == 1:
                mask = self.causal_mask[None, None, input_pos]  # (1, 1, 1, max_len)
        for layer in self.layers:
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                # keep only each block's input; recompute its inside during backward (memory for
                # compute)
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, cache_pos, mask,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache_pos, mask)
        return self.norm(x)

    def logits(self, h):
        return self.output(h)  # (..., vocab)

    @torch.no_grad()
    def resize_vocab(self, n: int):
        """Grow the vocabulary to n (for appended special tokens). New rows start at the mean of the
        old ones, so new tokens begin as an 'average' token rather than noise (Hewitt 2021)."""
        old = self.config.vocab_size
        if n < old:
            raise ValueError(f"cannot shrink the vocabulary from {old} to {n}")
        if n == old:
            return
        tied = self.config.tie_embeddings

        def grow(w):  # (old, dim) -> (n, dim)
            new = w.mean(0, keepdim=True).expand(n - old, -1)
            return nn.Parameter(torch.cat([w, new], 0), requires_grad=w.requires_grad)

        self.tok_embeddings.weight = grow(self.tok_embeddings.weight)
        self.tok_embeddings.num_embeddings = n
        self.output.weight = self.tok_embeddings.weight if tied else grow(self.output.weight)
        self.output.out_features = n
        self.config.vocab_size = n

    def flops(self, seq_len: int, head_positions: int) -> int:
        """Forward FLOPs of one sequence: 2 per multiply-add of every matmul, the head only at
        head_positions, plus attention_flops."""
        cfg, T = self.config, seq_len
        qkvo = 2 * cfg.n_heads * cfg.head_dim + 2 * cfg.n_kv_heads * cfg.head_dim
        weights = cfg.n_layers * (2 * T * cfg.dim * qkvo + 2 * T * 3 * cfg.dim * cfg.hidden_dim)
        return weights + 2 * head_positions * cfg.dim * cfg.vocab_size + self.attention_flops(T)

    def attention_flops(self, seq_len: int) -> int:
        """Scores and weighted values over the full T x T square, as nanoGPT, PaLM and torch's
        FlopCounterMode count them (a causal kernel skips about half)."""
        return self.config.n_layers * 4 * seq_len ** 2 * self.config.n_heads * self.config.head_dim

    @classmethod
    def empty(cls, cfg: LLaMAConfig, dtype=torch.float32) -> "LLaMA":
        """A model with uninitialised weights, for loading: no random init of billions of weights
        that are overwritten next."""
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device="cpu")
        if cfg.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight  # to_empty unties
        return model.to(dtype)

    @classmethod
    def from_pretrained(cls, folder, dtype=torch.float32) -> "LLaMA":
        """Read a Hugging Face LlamaForCausalLM folder: config.json plus model.safetensors or the
        shards named by model.safetensors.index.json (only the tensors we need are read)."""
        folder = Path(folder)
        cfg = llama_config_from_hf(folder / "config.json")
        model = cls.empty(cfg, dtype)
        mapping = llama_mapping(cfg.n_layers)
        if cfg.tie_embeddings:
            mapping["output.weight"] = None  # the same tensor as tok_embeddings.weight
        # old Llama-2 exports carry rotary inv_freq buffers; tied exports may carry a copy of the
        # head
        ignore = lambda k: (k.endswith("rotary_emb.inv_freq")
                            or (cfg.tie_embeddings and k == "lm_head.weight"))
        wanted = {k for k in safetensors_index(folder) if not ignore(k)}
        load_mapped(model, load_safetensors(folder, wanted), mapping, source=str(folder))
        return model


def llama_config_from_hf(path: Path) -> LLaMAConfig:
    """LLaMAConfig from a Hugging Face config.json; refuses anything that is not a plain LLaMA."""
    if not path.is_file():
        raise CheckpointError(
            f"{path}: not found (expected a Hugging Face LLaMA checkpoint folder)")
    hf = json.loads(path.read_text())
    arch = hf.get("architectures") or []
    if hf.get("model_type") != "llama" or (arch and "LlamaForCausalLM" not in arch):
        raise CheckpointError(
            f"{path}: model_type {hf.get('model_type')!r}, architectures {arch} "
            f"is not a LLaMA checkpoint (expected model_type 'llama', LlamaForCausalLM)")
    rope = hf.get("rope_parameters") or {}  # transformers >= 5 keeps rope_theta here
    scaling = hf.get("rope_scaling") or {}
    rope_type = (rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
                 or "default")
    problems = []
    if rope_type != "default":
        problems.append(f"rope scaling {rope_type!r}")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        problems.append("biases in attention or MLP")
    n_heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // n_heads):
        problems.append(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    if problems:
        raise CheckpointError(f"{path}: unsupported LLaMA variant: {', '.join(problems)}")
    return LLaMAConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        hidden_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


# -----------------------------------------------------------------------------
# LoRA


class LoRALinear(nn.Linear):
    """y = x W^T + (alpha / rank) x A^T B^T (Hu et al. 2021, LoRA). B starts at zero, so training
    starts exactly from the pretrained function; merged() folds the update into one plain Linear."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @classmethod
    def wrap(cls, linear: nn.Linear, rank: int, alpha: float) -> "LoRALinear":
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, rank, alpha, linear.bias is not None,
                  w.device, w.dtype)
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x):
        return super().forward(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        w = self.weight
        out = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device=w.device, dtype=w.dtype)
        out.weight.copy_(w + self.scale * (self.lora_b @ self.lora_a))
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out


def generalized_iou(a, b):
    """GIoU (Rezatofighi et al. 2019) of boxes (..., 4) [x0, y0, x1, y1]: IoU minus the share of the
    enclosing box that neither covers; in [-1, 1], and with a gradient even when the boxes do not
    meet."""
    # a corner order of its own
    a0, a1 = torch.minimum(a[..., :2], a[..., 2:]), torch.maximum(a[..., :2], a[..., 2:])
    area = lambda lo, hi: (hi - lo).clamp(min=0).prod(-1)
    inter = area(torch.maximum(a0, b[..., :2]), torch.minimum(a1, b[..., 2:]))
    union = area(a0, a1) + area(b[..., :2], b[..., 2:]) - inter
    hull = area(torch.minimum(a0, b[..., :2]), torch.maximum(a1, b[..., 2:]))
    return inter / union.clamp(min=1e-7) - (hull - union) / hull.clamp(min=1e-7)


# -----------------------------------------------------------------------------
# MiniGPT: ViT -> Q-Former -> splice into the prompt -> LLaMA


# The answer is a box where the tumour probability (MiniGPT.presence) is at least this, else "no
# tumour".
PRESENT_AT = 0.5

def shape_parts(s, vocab_size: int, max_seq_len: int = 1024) -> dict:
    """A run's sizes (config.Settings, or any object with its Shape fields) -> the vit, qformer and
    llm configs of a from-scratch MiniGPTConfig. The MLP widths follow: 4 x width, swiglu_hidden."""
    return dict(
        vit=ViTConfig(image_size=s.image_size, patch_size=s.patch_size, width=s.vit_width,
                      depth=s.vit_depth, heads=s.vit_heads, mlp_dim=4 * s.vit_width,
                      stem=s.vit_stem, stem_stride=s.stem_stride, stem_channels=s.stem_channels),
        qformer=QFormerConfig(num_query=s.num_query, width=s.qformer_width, depth=s.qformer_depth,
                              heads=s.qformer_heads, mlp_dim=4 * s.qformer_width,
                              cross_every=s.cross_every, vision_width=s.vit_width, out_dim=s.dim,
                              pooled_queries=s.pooled_queries),
        llm=LLaMAConfig(vocab_size=vocab_size, dim=s.dim, n_layers=s.n_layers, n_heads=s.n_heads,
                        n_kv_heads=s.n_kv_heads, hidden_dim=LLaMAConfig.swiglu_hidden(s.dim),
                        max_seq_len=max_seq_len, tie_embeddings=True),
    )


@dataclass
class MiniGPTConfig:
    vit: ViTConfig = field(default_factory=ViTConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLaMAConfig = field(default_factory=LLaMAConfig)
    n_images: int = 4  # modalities per sample
    # "per-image": one slot of Q tokens per image; "early": one slot for the study
    fusion: str = "per-image"
    # token ids of the prompt split at <ImageHere>: n_slots + 1 lists
    prompt_chunks: list = field(default_factory=list)
    num_bins: int = 64
    loc_start: int = 0  # id of <loc_0>; <loc_k> = loc_start + k
    box_end_id: int = 0
    eos_id: int = 0
    pad_id: int = 0
    max_boxes: int = 1
    lora_rank: int = 0  # 0 = off
    lora_alpha: float = 16.0
    # label smoothing over neighbouring location bins: Gaussian std in bins (0 = one-hot)
    loc_sigma: float = 0.0
    # "tokens": answer with location tokens; "regress": also an MLP box head at <box>
    box_head: str = "tokens"
    # answer: average the box with the mirrored box of the mirrored study (train.py: on with flips)
    flip_average: bool = False
    # weight of the auxiliary per-patch "inside the box" loss on the ViT tokens (0 = off)
    patch_loss: float = 0.0
    # its targets: each patch predicts the box's share of each of k x k cells of it
    patch_cells: int = 1

    @property
    def n_slots(self) -> int:
        return 1 if self.fusion == "early" else self.n_images

    @property
    def prompt_ids(self) -> list[int]:
        """The prompt's token ids, its chunks joined (the image slots between them hold no ids)."""
        return [i for chunk in self.prompt_chunks for i in chunk]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MiniGPTConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown MiniGPTConfig keys: {sorted(unknown)}")
        parts = {"vit": ViTConfig, "qformer": QFormerConfig, "llm": LLaMAConfig}
        return cls(**{k: parts[k](**v) if k in parts else v for k, v in d.items()})


class MiniGPT(nn.Module):
    """MiniGPT-4 (Zhu et al. 2023) for boxes: the N modality images of a slice go through the ViT as
    one batch, the Q-Former turns each image's tokens into Q embeddings of the LLM's width, which
    sit in fixed slots of a fixed prompt; the LLM answers with location tokens."""

    def __init__(self, cfg: MiniGPTConfig, vit: ViT | None = None, qformer: QFormer | None = None,
                 llm: LLaMA | None = None):
        super().__init__()
        if cfg.fusion not in ("per-image", "early"):
            raise ValueError(f"fusion must be 'per-image' or 'early', got {cfg.fusion!r}")
        if cfg.box_head not in ("tokens", "regress"):
            raise ValueError(f"box_head must be 'tokens' or 'regress', got {cfg.box_head!r}")
        if cfg.fusion == "early" and cfg.qformer.pooled_queries:
            raise ValueError("pooled queries pool one image's grid; early fusion feeds the "
                             "Q-Former several images at once")
        if len(cfg.prompt_chunks) != cfg.n_slots + 1:
            raise ValueError(f"prompt_chunks has {len(cfg.prompt_chunks)} chunks; {cfg.n_slots} "
                             f"image slot(s) ({cfg.fusion} fusion of {cfg.n_images} images) need "
                             f"{cfg.n_slots + 1}")
        prompt = cfg.prompt_ids
        ids = prompt + [cfg.loc_start, cfg.loc_start + cfg.num_bins - 1, cfg.box_end_id, cfg.eos_id,
                        cfg.pad_id]
        if max(ids) >= cfg.llm.vocab_size or min(ids) < 0:
            raise ValueError(f"token ids up to {max(ids)} do not fit the LLM's vocabulary of "
                             f"{cfg.llm.vocab_size}")
        self.cfg = cfg
        self.vit = vit or ViT(cfg.vit)
        self.qformer = qformer or QFormer(cfg.qformer)
        self.llm = llm or LLaMA(cfg.llm)
        # The original blog's box head: hidden -> hidden/2 -> 4, sigmoid, on the hidden state
        # at <box>.
        d = cfg.llm.dim
        self.box_mlp = (nn.Sequential(nn.Linear(d, d // 2), nn.GELU(), nn.Linear(d // 2, 4))
                        if cfg.box_head == "regress" else None)
        # see patch_loss_of
        k = cfg.patch_cells
        self.patch_head = nn.Linear(cfg.vit.width, k * k) if cfg.patch_loss > 0 else None
        # the prompt never changes, so each image slot sits at a fixed position (static shapes)
        self.chunk_sizes = [len(c) for c in cfg.prompt_chunks]
        self.register_buffer("prompt_ids", torch.tensor(prompt, dtype=torch.long), persistent=False)
        Q = cfg.qformer.num_query
        self.slot_starts = [sum(self.chunk_sizes[:k + 1]) + k * Q for k in range(cfg.n_slots)]
        self.prompt_len = sum(self.chunk_sizes) + cfg.n_slots * Q
        answer_len = 4 * cfg.max_boxes + 2  # locs, </box>, EOS
        if self.prompt_len + answer_len > cfg.llm.max_seq_len:
            raise ValueError(f"prompt ({self.prompt_len}) + answer ({answer_len}) tokens exceed "
                             f"max_seq_len {cfg.llm.max_seq_len}")
        if cfg.lora_rank > 0:
            for layer in self.llm.layers:
                layer.attn.wq = LoRALinear.wrap(layer.attn.wq, cfg.lora_rank, cfg.lora_alpha)
                layer.attn.wv = LoRALinear.wrap(layer.attn.wv, cfg.lora_rank, cfg.lora_alpha)
        self.frozen = dict(vit=False, qformer=False, llm=False)

    # ---- building, freezing, LoRA

    @classmethod
    def build(cls, cfg: MiniGPTConfig, vision_folder=None, llm_folder=None) -> "MiniGPT":
        """A model with pretrained parts where folders are given. The loaded parts' configs replace
        cfg's (read the result's .cfg): from llm_folder all of cfg.llm except vocab_size (the
        tokenizer's, whose appended tokens grow the vocabulary); from a BLIP-2 vision_folder the ViT
        (at cfg.vit.image_size) and the Q-Former; from a CLIP/SigLIP folder the ViT only."""
        cfg = MiniGPTConfig.from_dict(cfg.to_dict())  # a copy
        llm = vit = qformer = None
        if llm_folder is not None:
            llm = LLaMA.from_pretrained(llm_folder)
            if cfg.llm.vocab_size < llm.config.vocab_size:
                raise ValueError(f"{llm_folder}: the tokenizer's {cfg.llm.vocab_size} tokens are "
                                 f"fewer than the checkpoint's vocabulary of "
                                 f"{llm.config.vocab_size}")
            llm.resize_vocab(cfg.llm.vocab_size)
            cfg.llm = llm.config
        cfg.qformer.out_dim = cfg.llm.dim
        if vision_folder is not None:
            vit = ViT.from_pretrained(vision_folder, image_size=cfg.vit.image_size)
            cfg.vit = vit.cfg
            cfg.qformer.vision_width = cfg.vit.width
            if (json.loads((Path(vision_folder) / "config.json").read_text()).get("model_type")
                    == "blip-2"):
                qformer = QFormer.from_pretrained(vision_folder, out_dim=cfg.llm.dim)
                cfg.qformer = qformer.cfg
        return cls(cfg, vit, qformer, llm)

    def freeze(self, vit: bool = False, qformer: bool = False, llm: bool = False):
        """Stop training parts. A frozen Q-Former keeps its output Linear `proj` trainable
        (MiniGPT-4 trains only that); a frozen LLM keeps its LoRA adapters and its embedding and
        head trainable, because the appended location tokens start as copies of the mean row and
        must learn."""
        self.frozen = dict(vit=vit, qformer=qformer, llm=llm)
        for p in self.vit.parameters():
            p.requires_grad_(not vit)
        for name, p in self.qformer.named_parameters():
            p.requires_grad_(not qformer or name.startswith("proj."))
        for name, p in self.llm.named_parameters():
            keep = "lora_" in name or name.startswith(("tok_embeddings.", "output."))
            p.requires_grad_(not llm or keep)
        self.train(self.training)

    def configure_optimizers(self, lr: float, weight_decay: float, device):
        """AdamW over the parameters that train, fused (one kernel for all of them: on the CPU
        recipe's 169 tensors 2.1 ms a step instead of 8.8, docs/results.md); weight decay on
        matrices only (not on norms, biases and the learned queries). -> (those parameters, the
        optimizer)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return params, torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95),
                                         fused=torch.device(device).type in ("cuda", "cpu"))

    def train(self, mode: bool = True):
        """nn.Module.train, but a frozen ViT stays in eval mode: the BatchNorm of a conv stem then
        keeps its statistics, so the ViT really is fixed (and train.py --cache-features stays
        exact)."""
        super().train(mode)
        if self.frozen["vit"]:
            self.vit.eval()
        return self

    def merge_lora(self):
        """Fold every LoRA adapter into its weight; the model becomes a plain one (lora_rank 0)."""
        for layer in self.llm.layers:
            for name in ("wq", "wv"):
                lin = getattr(layer.attn, name)
                if isinstance(lin, LoRALinear):
                    setattr(layer.attn, name, lin.merged())
        self.cfg.lora_rank = 0

    # ---- the sequence

    def vit_features(self, images):
        """images (B, N, 3, S, S) -> ViT features (B, N, T, W): every modality through the ViT as
        one batch. A frozen ViT runs without autograd and may be held in bf16 (inputs follow its
        dtype); its output is then a fixed function of the pixels, which train.py --cache-features
        computes once per image."""
        B, N = images.shape[:2]
        if N != self.cfg.n_images:
            raise ValueError(f"got {N} images per sample, the model was built for "
                             f"{self.cfg.n_images}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen["vit"]):
            feats = self.vit(images.flatten(0, 1).to(self.vit.pos_embed.dtype))  # (B*N, T, W)
        return feats.view(B, N, *feats.shape[1:])

    def encode_images(self, images=None, feats=None):
        """images (B, N, 3, S, S), or their ViT features (B, N, T, W) from vit_features ->
        image embeddings (B, n_slots, Q, dim)."""
        feats = self.vit_features(images) if feats is None else feats
        return self.project_features(feats)

    def project_features(self, feats):
        """ViT features (B, N, T, W) -> image embeddings (B, n_slots, Q, dim) through the
        Q-Former."""
        B = feats.shape[0]
        feats = feats.flatten(0, 1).to(self.qformer.query.dtype)  # (B*N, T, W)
        if self.cfg.fusion == "early":  # the blog's variant: one Q-Former pass over all images
            feats = feats.reshape(B, -1, feats.shape[-1])  # (B, N*T, W)
        embeds = self.qformer(feats)  # (B * n_slots, Q, dim)
        return embeds.view(B, self.cfg.n_slots, *embeds.shape[1:])  # (B, n_slots, Q, dim)

    def splice_images(self, embeds, tail=None):
        """embeds (B, n_slots, Q, dim), tail (B, L, dim) or None -> (B, prompt_len [+ L], dim):
        [text_0, embeds_1, text_1, ..., embeds_n, text_n, tail]. A torch.cat of fixed-size pieces,
        so the slots sit at the same positions in every batch and compiled graphs see static
        shapes."""
        B = embeds.shape[0]
        text = self.llm.tok_embeddings(self.prompt_ids)  # (P_text, dim)
        chunks = text.split(self.chunk_sizes)
        pieces = [chunks[0].expand(B, -1, -1)]
        for k in range(self.cfg.n_slots):
            pieces += [embeds[:, k].to(text.dtype), chunks[k + 1].expand(B, -1, -1)]
        if tail is not None:
            pieces.append(tail)
        return torch.cat(pieces, dim=1)

    def forward(self, images, answer, answer_mask, boxes=None, feats=None):
        """images (B, N, 3, S, S) (or None with feats (B, N, T, W), a frozen ViT's cached output),
        answer (B, L) ids, answer_mask (B, L) bool -> mean cross-entropy over the answer tokens
        where answer_mask is True. The answer is fed shifted (teacher forcing); logits are computed
        only at the L positions that predict answer tokens (the head is the costly part). With
        loc_sigma > 0 a location token's target is a Gaussian over the neighbouring bins, so a near
        miss costs less than a far one. With the regress head, boxes (B, 4) normalised [x0, y0, x1,
        y1], when given, add L1 + (1 - GIoU) of the head's box, as in the original blog, averaged
        over the rows whose answer has a box (a "no tumour" row, `</box>` first, teaches only its
        tokens)."""
        L = answer.shape[1]
        feats = self.vit_features(images) if feats is None else feats  # (B, N, T, W)
        text = self.llm.tok_embeddings(answer[:, :-1])  # (B, L-1, dim)
        x = self.splice_images(self.project_features(feats), text)  # (B, P+L-1, dim)
        h = self.llm(x, torch.arange(x.shape[1], device=x.device))  # (B, P+L-1, dim)
        # (B, L, V): position P-1+j predicts answer[:, j]
        logits = self.llm.logits(h[:, -L:]).float()
        targets = answer.masked_fill(~answer_mask, -100)
        if self.cfg.loc_sigma > 0:
            loss = self.smoothed_loss(logits, answer, answer_mask)
        else:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        if self.box_mlp is not None and boxes is not None:
            pred = self.box_mlp(h[:, -L].float()).sigmoid()  # (B, 4): the hidden state at <box>
            # (B,) rows with a box ("no tumour" has none)
            has = (answer[:, 0] != self.cfg.box_end_id).float()
            per_row = (F.l1_loss(pred, boxes, reduction="none").mean(-1) + 1
                       - generalized_iou(pred, boxes))
            loss = loss + (per_row * has).sum() / has.sum().clamp(min=1)
        if self.patch_head is not None and boxes is not None:
            loss = loss + self.cfg.patch_loss * self.patch_loss_of(feats, boxes)
        return loss

    def patch_loss_of(self, feats, boxes):
        """Auxiliary dense loss: every ViT patch token of every modality predicts the share of each
        of its k x k cells (k = patch_cells) that the box covers (binary cross-entropy against that
        share). feats (B, N, T, W), boxes (B, 4) normalised -> scalar. A box gives 4 numbers per
        study to learn from, this gives (g k)^2 per image and a gradient straight into the ViT, so
        its tokens learn what a tumour looks like and where it is from the first steps instead of
        waiting for the answer's gradient through the LLM; k > 1 asks a large patch where inside
        it the tumour sits."""
        g, k = self.cfg.vit.grid, self.cfg.patch_cells
        patches = feats[:, :, -g * g:]  # (B, N, g*g, W): the class token, if any, comes first
        logits = self.patch_head(patches.float())  # (B, N, g*g, k*k)
        n = g * k  # cells per side
        edges = torch.arange(n + 1, device=boxes.device) / n  # (n+1,) cell borders
        # (B, n) share of each cell column/row inside [lo, hi]
        cover = lambda lo, hi: ((torch.minimum(hi[:, None], edges[None, 1:])
                                 - torch.maximum(lo[:, None], edges[None, :-1]))
                                .clamp(min=0) * n)
        x0, y0, x1, y1 = boxes.float().unbind(-1)
        share = cover(y0, y1)[:, :, None] * cover(x0, x1)[:, None, :]  # (B, n, n), rows first
        # (B, g*g, k*k): patch (row, col) rows first, then its cells rows first
        share = share.view(-1, g, k, g, k).permute(0, 1, 3, 2, 4).reshape(-1, g * g, k * k)
        return F.binary_cross_entropy_with_logits(logits, share[:, None].expand_as(logits))

    def smoothed_loss(self, logits, answer, answer_mask):
        """Cross-entropy against soft targets: a Gaussian of std loc_sigma bins around the true bin
        for location tokens, one-hot for the others. logits (B, L, V) -> mean over the masked
        positions."""
        c = self.cfg
        logp = logits.log_softmax(-1)  # (B, L, V)
        k = answer - c.loc_start  # (B, L): the true bin where the token is a location
        is_loc = (k >= 0) & (k < c.num_bins)
        # elsewhere unused, but kept finite: 0/0 there would poison the gradient
        k = k.clamp(0, c.num_bins - 1)
        bins = torch.arange(c.num_bins, device=answer.device)
        soft = torch.exp(-0.5 * ((bins - k[..., None]) / c.loc_sigma) ** 2)  # (B, L, bins)
        soft = soft / soft.sum(-1, keepdim=True)
        loc_nll = -(soft * logp[..., c.loc_start: c.loc_start + c.num_bins]).sum(-1)  # (B, L)
        hard_nll = -logp.gather(-1, answer[..., None]).squeeze(-1)  # (B, L)
        nll = torch.where(is_loc, loc_nll, hard_nll)
        m = answer_mask.float()
        return (nll * m).sum() / m.sum()

    def flops_per_sample(self, train: bool = True) -> int:
        """FLOPs of one training sample (forward + backward; forward only with train=False), counted
        by hand for MFU: every matmul and conv at 2 FLOPs per multiply-add, attention over the full
        square (see LLaMA.attention_flops), elementwise work (norms, pooling) not. Backward costs
        one forward per operand that needs a gradient: the weights when they train, the input when
        something before it trains; a frozen part that nothing before it trains runs without
        autograd. The LLM's head, the Q-Former's proj and the patch head always train (see freeze).
        Equal to torch's FlopCounterMode (tests), except for LoRA adapters (small) and a frozen
        Q-Former after a trained ViT (not a setup we use)."""
        c, v = self.cfg, self.cfg.vit
        n_img = c.n_images
        tokens = v.grid ** 2 + int(v.class_token)  # ViT tokens per image
        # Q-Former passes, tokens each reads
        passes, keys = (1, n_img * tokens) if c.fusion == "early" else (n_img, tokens)
        answer_len = 4 * c.max_boxes + 2
        seq = self.prompt_len + answer_len - 1
        stem = self.vit.stem_flops()  # per image, one entry per conv
        qf = self.qformer.flops(keys)  # one pass, by part
        attn = self.llm.attention_flops(seq)
        forward = dict(  # of one sample, per part
            stem_first=n_img * stem[0], stem_rest=n_img * sum(stem[1:]),
            vit=n_img * self.vit.flops(),
            patch_head=(n_img * 2 * v.grid ** 2 * v.width * c.patch_cells ** 2
                        if self.patch_head is not None else 0),
            qformer=passes * qf["layers"], kv=passes * qf["kv"], pooled=passes * qf["pooled"],
            proj=passes * qf["proj"],
            llm=self.llm.flops(seq, 0) - attn, attn=attn, head=self.llm.flops(0, answer_len))
        if not train:
            return sum(forward.values())
        fv, fq, fl = self.frozen["vit"], self.frozen["qformer"], self.frozen["llm"]
        # forward + the backward matmuls
        times = lambda weights, inputs: 1 + int(weights) + int(inputs)
        factor = dict(
            stem_first=times(not fv, False), stem_rest=times(not fv, not fv),
            vit=times(not fv, not fv), patch_head=times(True, not fv),
            qformer=times(True, True) if not fq else times(False, True) if not fv else 1,
            kv=times(not fq, not fv), pooled=times(not fq, not fv),
            proj=times(True, not (fq and fv)),
            llm=times(not fl, True), attn=3, head=3)
        return sum(f * factor[k] for k, f in forward.items())

    # ---- answering

    def grammar_step(self, logits, t: int, done, min_boxes: int = 1):
        """One greedy step of the box grammar: location tokens in groups of 4, `</box>` only after a
        complete group (and at least min_boxes), at most max_boxes groups. logits (B, V), done (B,)
        bool -> next token (B,), bin (B,) (-1 once done), done. Between groups the choice is between
        two branches, ending or starting a box, so `</box>` is weighed against all location tokens
        together (their logsumexp: see presence), not against the single likeliest one. Branches
        only on the step t (a Python int), never on tensor values, so there is no host
        synchronisation per token."""
        cfg = self.cfg
        loc = logits[:, cfg.loc_start: cfg.loc_start + cfg.num_bins]  # (B, bins)
        best = loc.argmax(-1)
        if t % 4 == 0 and t // 4 >= min_boxes:  # between groups: `</box>` may end the answer
            done = done | (logits[:, cfg.box_end_id] > loc.logsumexp(-1))
        token = torch.where(done, cfg.box_end_id, cfg.loc_start + best)
        return token, torch.where(done, -1, best), done

    def presence(self, logits):
        """logits (B, V) at `<box>` -> (B,) the probability that the answer starts a box (a tumour)
        rather than `</box>` (none): the grammar allows only these there, so p = sum of the location
        tokens' probabilities over that plus `</box>`'s
        = sigmoid(logsumexp(loc) - logit(</box>))."""
        cfg = self.cfg
        loc = logits[:, cfg.loc_start: cfg.loc_start + cfg.num_bins].float()
        return torch.sigmoid(loc.logsumexp(-1) - logits[:, cfg.box_end_id].float())

    def decode_step(self, token, input_pos):
        """token (B,), input_pos (1,) -> logits (B, V) of the next token, through the KV cache."""
        # (B, 1, dim)
        h = self.llm(self.llm.tok_embeddings(token)[:, None], input_pos, use_cache=True)
        return self.llm.logits(h[:, -1])

    def compile_decode(self):
        """Compile decode_step, the one-token step of generate. The static KV cache gives every
        position the same shapes, so one graph serves the whole answer; on CUDA it is captured as a
        CUDA graph ("reduce-overhead"): a token costs one graph launch instead of a kernel launch
        per operation. Compile after moving the model to its device; a new batch size compiles (and
        captures) once more."""
        cuda = next(self.parameters()).device.type == "cuda"
        self.decode_step = torch.compile(self.decode_step,
                                         mode="reduce-overhead" if cuda else "default",
                                         fullgraph=True)

    @torch.no_grad()
    def prefill(self, images):
        """images (B, N, 3, S, S) -> logits (B, V) of the first answer token, the prompt in the KV
        cache."""
        x = self.splice_images(self.encode_images(images))  # (B, P, dim)
        B, P, device = x.shape[0], x.shape[1], x.device
        dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                 else x.dtype)
        max_len = P + 4 * self.cfg.max_boxes
        cache = self.llm.layers[0].attn.kv_cache
        if (cache is None or cache.k.shape[0] != B or cache.k.shape[2] != max_len
                or cache.k.dtype != dtype):
            self.llm.setup_cache(B, max_len, dtype, device)
        # (B, V)
        return self.llm.logits(self.llm(x, torch.arange(P, device=device), use_cache=True)[:, -1])

    @torch.no_grad()
    def generate(self, images, min_boxes: int = 1, logits=None):
        """images (B, N, 3, S, S) -> (B, 4 * max_boxes) bins; -1 after `</box>` (forced after
        max_boxes groups; with min_boxes=0 a row of -1 is the answer "no tumour"). Greedy, KV cache:
        one prefill of the prompt, then one cached step per token. logits: prefill's output, when
        already computed."""
        logits = self.prefill(images) if logits is None else logits
        B, n, device = logits.shape[0], 4 * self.cfg.max_boxes, logits.device
        out = torch.full((B, n), -1, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        input_pos = torch.tensor([self.prompt_len], device=device)
        for t in range(n):
            token, bins, done = self.grammar_step(logits, t, done, min_boxes)
            out[:, t] = bins
            if t + 1 < n:
                logits = self.decode_step(token, input_pos)
                input_pos += 1
        return out

    @torch.no_grad()
    def answer_boxes(self, images):
        """images (B, N, 3, S, S) -> boxes (B, 4) normalised [x0, y0, x1, y1], p (B,) the
        probability of a tumour (see presence; the answer is "no tumour" where p < PRESENT_AT). The
        box is the first answered box, read at its bins' centres (tokens), or the box head's output
        (regress: one prefill, no decoding); it is there for every row, so a caller may still look
        at it where p is low. With cfg.flip_average, the mean of that box and the mirror image of
        the box answered for the left-right mirrored study, and the mean of both p (one batch of
        2B): a model trained with random flips answers both."""
        if not self.cfg.flip_average:
            return self.answer_boxes_once(images)
        B = images.shape[0]
        b, p = self.answer_boxes_once(torch.cat([images, images.flip(-1)]))  # (2B, 4), (2B,)
        x0, y0, x1, y1 = b[B:].unbind(-1)
        return (b[:B] + torch.stack([1 - x1, y0, 1 - x0, y1], -1)) / 2, (p[:B] + p[B:]) / 2

    @torch.no_grad()
    def answer_boxes_once(self, images):
        """answer_boxes without flip averaging: images (B, N, 3, S, S) -> boxes (B, 4) normalised,
        p (B,)."""
        if self.box_mlp is not None:
            x = self.splice_images(self.encode_images(images))  # (B, P, dim)
            h = self.llm(x, torch.arange(x.shape[1], device=x.device))[:, -1]  # (B, dim) at <box>
            # (B, 4); bf16 weights too
            b = self.box_mlp(h.to(self.box_mlp[0].weight.dtype)).float().sigmoid()
            p = self.presence(self.llm.logits(h))
        else:
            logits = self.prefill(images)
            p = self.presence(logits)
            # (B, 4); min_boxes=1: no -1 here
            b = (self.generate(images, logits=logits)[:, :4].float() + 0.5) / self.cfg.num_bins
        # corners in order: x0 <= x1, y0 <= y1
        return b.view(-1, 2, 2).sort(1).values.view(-1, 4), p

    # ---- checkpoints

    def save_pretrained(self, folder, extra: dict | None = None):
        """Write model.safetensors and config.json (the config, plus `extra` under "meta")."""
        from safetensors.torch import save_model

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(self, str(folder / "model.safetensors"))  # a tied head is stored once
        config = {**self.cfg.to_dict(), "meta": extra or {}}
        (folder / "config.json").write_text(json.dumps(config, indent=1))

    @classmethod
    def from_checkpoint(cls, folder) -> "MiniGPT":
        """Rebuild a model written by save_pretrained."""
        from safetensors.torch import load_model

        folder = Path(folder)
        for name in ("config.json", "model.safetensors"):
            if not (folder / name).is_file():
                raise CheckpointError(f"{folder / name}: not found "
                                      f"(expected a folder written by save_pretrained)")
        try:
            d = json.loads((folder / "config.json").read_text())
            d.pop("meta", None)
            cfg = MiniGPTConfig.from_dict(d)
            model = cls(cfg, llm=LLaMA.empty(cfg.llm))
        except Exception as e:  # bad JSON, unknown or missing keys, impossible sizes
            raise CheckpointError(f"{folder / 'config.json'}: not a MiniGPT config "
                                  f"({type(e).__name__}: {e})") from None
        try:
            load_model(model, str(folder / "model.safetensors"), strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{folder / 'model.safetensors'}: does not match its "
                                  f"config.json: {' '.join(str(e).split())[:300]}") from None
        except Exception as e:  # safetensors' own errors: truncated file, bad header
            raise CheckpointError(f"{folder / 'model.safetensors'}: cannot be read ({e})") from None
        return model


# -----------------------------------------------------------------------------
# train.py's helpers that bench.py times too, and reading a checkpoint folder

@torch.no_grad()
def update_ema(ema, model, decay, step):
    """ema <- d * ema + (1 - d) * model over the trained parameters, d = min(decay, (1 + step) /
    (10 + step)): the early average does not hold on to the random start. The BatchNorm statistics
    are the model's own, copied."""
    d = min(decay, (1 + step) / (10 + step))
    pairs = [(e, p) for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
    torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1 - d)  # one fused op
    buffers = dict(ema.named_buffers())
    for name, b in model.named_buffers():
        if name in buffers:
            buffers[name].copy_(b)


def find_checkpoint(path) -> Path:
    """A checkpoint folder holds model.safetensors and config.json; train.py's --out folder holds
    one under ckpt/."""
    path = Path(path)
    for folder in (path, path / "ckpt"):
        if (folder / "model.safetensors").exists() and (folder / "config.json").exists():
            return folder
    raise CheckpointError(f"no checkpoint in {path}: expected "
                          f"{path / 'ckpt' / 'model.safetensors'} "
                          f"(train one with `python train.py --out {path}`) or a folder holding "
                          f"model.safetensors and config.json")


def load_checkpoint(path) -> tuple[Path, MiniGPT, dict]:
    """sample.py's and bench.py's one way to read a trained run: -> (its checkpoint folder, the
    model in eval mode on the CPU, config.json's "meta": what an answer needs besides the weights,
    i.e. modalities, image_size, mean, std, box_format, template)."""
    folder = find_checkpoint(path)
    model = MiniGPT.from_checkpoint(folder)
    meta = json.loads((folder / "config.json").read_text()).get("meta")
    if not isinstance(meta, dict) or "modalities" not in meta:
        raise CheckpointError(f"{folder / 'config.json'}: no \"meta\" with the data settings "
                              f"(not written by train.py)")
    return folder, model.eval(), meta
