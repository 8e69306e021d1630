"""Tests for model.py: LLaMA parity with Hugging Face, strict loading, KV cache, the spliced model."""

import json

import pytest
import torch
import torch.nn.functional as F

import model as model_module
from model import LLaMA, LLaMAConfig


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def hf_llama(folder, tied, seed=0, **save_kwargs):
    """A tiny random LlamaForCausalLM (grouped-query) with every parameter perturbed, saved to folder."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        max_position_embeddings=64)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # default inits (norms at 1, zeros) would hide mapping mistakes
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder, **save_kwargs)
    return hf


def our_logits(llm, ids):
    return llm.logits(llm(llm.tok_embeddings(ids), torch.arange(ids.shape[1])))


@pytest.mark.parametrize("tied", [False, True])
def test_llama_parity_with_transformers(tmp_path, tied):
    hf = hf_llama(tmp_path, tied)
    llm = LLaMA.from_pretrained(tmp_path).eval()
    assert llm.config.n_kv_heads == 2 and llm.config.tie_embeddings == tied
    assert (llm.output.weight is llm.tok_embeddings.weight) == tied
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = our_logits(llm, ids)
    assert rel_err(ours, ref) <= 1e-4


def test_llama_sharded_folder(tmp_path):
    hf = hf_llama(tmp_path, tied=False, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    llm = LLaMA.from_pretrained(tmp_path).eval()
    ids = torch.arange(10)[None] * 7 % 97
    with torch.no_grad():
        assert rel_err(our_logits(llm, ids), hf(ids).logits) <= 1e-4


def test_broken_mapping_fails(tmp_path, monkeypatch):
    hf = hf_llama(tmp_path, tied=False)
    ids = torch.arange(10)[None] * 5 % 97
    # gate and up swapped: same shapes, so only parity can catch it
    names = dict(model_module.LLAMA_HF_NAMES)
    names["layers.{i}.ffn.w1.weight"], names["layers.{i}.ffn.w3.weight"] = (
        names["layers.{i}.ffn.w3.weight"], names["layers.{i}.ffn.w1.weight"])
    monkeypatch.setattr(model_module, "LLAMA_HF_NAMES", names)
    with torch.no_grad():
        assert rel_err(our_logits(LLaMA.from_pretrained(tmp_path), ids), hf(ids).logits) > 1e-2
    # q and k swapped: grouped-query shapes differ, so loading names the tensor
    names = dict(model_module.LLAMA_HF_NAMES)
    names["layers.{i}.attn.wq.weight"] = "model.layers.{i}.self_attn.k_proj.weight"
    monkeypatch.setattr(model_module, "LLAMA_HF_NAMES", names)
    with pytest.raises(ValueError, match=r"wrongly shaped.*k_proj.*layers.0.attn.wq.weight"):
        LLaMA.from_pretrained(tmp_path)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_llama(tmp_path, tied=False)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        LLaMA.from_pretrained(tmp_path)
    assert "missing tensors: model.layers.1.mlp.up_proj.weight" in str(e.value)
    assert "unexpected tensors: model.layers.0.self_attn.q_proj.bias" in str(e.value)


def test_wrong_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "opt", "architectures": ["OPTForCausalLM"], "hidden_size": 32}))
    with pytest.raises(ValueError, match=r"config.json: .*'opt'.*not a LLaMA checkpoint"):
        LLaMA.from_pretrained(tmp_path)
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32,
           "num_attention_heads": 4, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported LLaMA variant: rope scaling 'llama3'"):
        LLaMA.from_pretrained(tmp_path)


def tiny_llama(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = LLaMAConfig(**{**dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
                                max_seq_len=64), **kw})
    return LLaMA(cfg).eval()


def test_kv_cache_equals_full_recomputation():
    llm = tiny_llama()
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        full = llm.logits(llm(x, torch.arange(12)))  # (2, 12, V)
        llm.setup_cache(2, 16)
        steps = [llm.logits(llm(x[:, :7], torch.arange(7), use_cache=True))]  # prefill
        for t in range(7, 12):  # then one token at a time
            steps.append(llm.logits(llm(x[:, t:t + 1], torch.tensor([t]), use_cache=True)))
    cached = torch.cat(steps, 1)
    assert rel_err(cached, full) <= 1e-5


@pytest.mark.parametrize("tied", [False, True])
def test_resize_vocab_mean_rows(tied):
    llm = tiny_llama(tie_embeddings=tied)
    emb, head = llm.tok_embeddings.weight.clone(), llm.output.weight.clone()
    llm.resize_vocab(70)
    assert llm.tok_embeddings.weight.shape == (70, 32) and llm.output.weight.shape == (70, 32)
    assert llm.config.vocab_size == 70
    assert torch.equal(llm.tok_embeddings.weight[:61], emb)
    assert torch.allclose(llm.tok_embeddings.weight[61:], emb.mean(0).expand(9, -1))
    assert torch.allclose(llm.output.weight[61:], head.mean(0).expand(9, -1))
    assert (llm.output.weight is llm.tok_embeddings.weight) == tied
    h = llm(torch.randn(1, 3, 32), torch.arange(3))
    assert llm.logits(h).shape == (1, 3, 70)
    with pytest.raises(ValueError, match="cannot shrink"):
        llm.resize_vocab(10)
