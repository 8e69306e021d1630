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

# -----------------------------------------------------------------------------
# LLaMA


@dataclass
class LLaMAConfig:
    vocab_size: int = 512
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4  # grouped-query attention: each kv head serves n_heads // n_kv_heads q heads
    hidden_dim: int = 688  # SwiGLU width
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False

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
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_cos_sin(input_pos, head_dim: int, theta: float):
    """cos, sin (T, head_dim) for positions input_pos (T,), in the half-split layout:
    frequency k sits at columns k and k + head_dim/2, which is how Hugging Face stores LLaMA's
    q/k weights (its conversion script permuted Meta's interleaved pairs), so they load unpermuted."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=input_pos.device).float() / head_dim)
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

    def forward(self, x, cos, sin, input_pos, mask):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if mask is not None:  # cached decoding: attend over the whole static cache, masked
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nkv, max_len, hd)
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:  # query head h reads kv head h // rep, as Hugging Face's repeat_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
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

    def forward(self, x, cos, sin, input_pos, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, input_pos, mask)
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


class LLaMA(nn.Module):
    """LLaMA-style decoder. forward takes embeddings (so image embeddings can be spliced in) and
    returns the final-normed hidden states; logits(h) applies the head only where it is needed."""

    def __init__(self, cfg: LLaMAConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.causal_mask: torch.Tensor | None = None
        self.init_weights()

    def init_weights(self):
        """From-scratch init (GPT-2 / nanoGPT): N(0, 0.02) for embeddings and linears, the two
        projections that write into the residual stream scaled by 1/sqrt(2 * n_layers), norms at 1."""
        std = 0.02
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
            raise ValueError(f"sequence of {max_len} tokens exceeds the model's max_seq_len {cfg.max_seq_len}")
        dtype = dtype or self.tok_embeddings.weight.dtype
        device = device or self.tok_embeddings.weight.device
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(batch, cfg.n_kv_heads, max_len, cfg.head_dim, dtype, device)
        self.causal_mask = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool, device=device))

    def forward(self, x, input_pos, use_cache: bool = False):
        # x (B, T, dim) embeddings, input_pos (T,) long positions -> (B, T, dim) hidden after final norm
        cos, sin = rope_cos_sin(input_pos, self.config.head_dim, self.config.rope_theta)  # (T, hd)
        mask = None
        if use_cache:
            assert self.causal_mask is not None, "call setup_cache() first"
            mask = self.causal_mask[None, None, input_pos]  # (1, 1, T, max_len)
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask)
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

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token: 2 per multiply-add of every matmul (head included), plus attention
        scores and values over an average causal context of seq_len / 2 (counted as in PaLM's appendix
        but causal). Training (forward + backward) is 3x this."""
        cfg = self.config
        hd = cfg.head_dim
        per_layer = 2 * cfg.dim * (cfg.n_heads * hd + 2 * cfg.n_kv_heads * hd + cfg.n_heads * hd)
        per_layer += 2 * 3 * cfg.dim * cfg.hidden_dim
        per_layer += 2 * 2 * cfg.n_heads * hd * (seq_len / 2)  # q @ k^T and att @ v
        return int(cfg.n_layers * per_layer + 2 * cfg.dim * cfg.vocab_size)

    @classmethod
    def from_pretrained(cls, folder, dtype=torch.float32) -> "LLaMA":
        """Read a Hugging Face LlamaForCausalLM folder: config.json plus model.safetensors or the
        shards named by model.safetensors.index.json (only the tensors we need are read)."""
        folder = Path(folder)
        cfg = llama_config_from_hf(folder / "config.json")
        with torch.device("meta"):  # no random init of billions of weights that are overwritten next
            model = cls(cfg)
        model.to_empty(device="cpu")
        if cfg.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight  # to_empty unties
        model.to(dtype)
        mapping = {}
        for ours, theirs in LLAMA_HF_NAMES.items():
            if ours == "output.weight" and cfg.tie_embeddings:
                continue
            for i in range(cfg.n_layers) if "{i}" in ours else [None]:
                mapping[ours.format(i=i)] = theirs.format(i=i)
        # old Llama-2 exports carry rotary inv_freq buffers; tied exports may carry a copy of the head
        ignore = lambda k: k.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and k == "lm_head.weight")
        tensors = _load_safetensors(folder, ignore)
        _load_mapped(model, tensors, mapping, folder)
        return model


def llama_config_from_hf(path: Path) -> LLaMAConfig:
    """LLaMAConfig from a Hugging Face config.json; refuses anything that is not a plain LLaMA."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (expected a Hugging Face LLaMA checkpoint folder)")
    hf = json.loads(path.read_text())
    arch = hf.get("architectures") or []
    if hf.get("model_type") != "llama" or (arch and "LlamaForCausalLM" not in arch):
        raise ValueError(
            f"{path}: model_type {hf.get('model_type')!r}, architectures {arch} is not a LLaMA checkpoint "
            f"(expected model_type 'llama', LlamaForCausalLM)")
    rope = hf.get("rope_parameters") or {}  # transformers >= 5 keeps rope_theta here
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
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
        raise ValueError(f"{path}: unsupported LLaMA variant: {', '.join(problems)}")
    return LLaMAConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        hidden_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


# -----------------------------------------------------------------------------
# reading safetensors checkpoints


def _load_safetensors(folder: Path, ignore) -> dict:
    """All tensors of model.safetensors or its shards (model.safetensors.index.json) whose name
    ignore(name) does not reject; files are opened lazily, so skipped tensors are never read."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: neither model.safetensors nor model.safetensors.index.json found")
    tensors = {}
    for name in files:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: shard named by {index.name} is missing")
        with safe_open(folder / name, framework="pt") as f:
            for key in f.keys():
                if not ignore(key):
                    tensors[key] = f.get_tensor(key)
    return tensors


@torch.no_grad()
def _load_mapped(model: nn.Module, tensors: dict, mapping: dict, folder):
    """Copy tensors[mapping[ours]] into each parameter `ours`; any missing, unexpected or wrongly
    shaped tensor is an error that names it."""
    params = dict(model.named_parameters())
    assert set(mapping) == set(params), f"mapping does not cover {sorted(set(params) ^ set(mapping))}"
    missing = [theirs for theirs in mapping.values() if theirs not in tensors]
    unexpected = sorted(set(tensors) - set(mapping.values()))
    shapes = [f"{theirs} {tuple(tensors[theirs].shape)} (expected {tuple(params[ours].shape)} for {ours})"
              for ours, theirs in mapping.items()
              if theirs in tensors and tensors[theirs].shape != params[ours].shape]
    problems = [f"missing tensors: {', '.join(missing)}"] if missing else []
    problems += [f"unexpected tensors: {', '.join(unexpected)}"] if unexpected else []
    problems += [f"wrongly shaped tensors: {'; '.join(shapes)}"] if shapes else []
    if problems:
        raise ValueError(f"{folder}: checkpoint does not match the model: " + " | ".join(problems))
    for ours, theirs in mapping.items():
        params[ours].copy_(tensors[theirs])
