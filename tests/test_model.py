"""Tests for model.py: LLaMA parity with Hugging Face, strict loading, KV cache, the spliced
model."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import model as model_module
from model import LLaMA, LLaMAConfig, generalized_iou


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def hf_llama(folder, tied, seed=0, **save_kwargs):
    """A tiny random LlamaForCausalLM (grouped-query) with every parameter perturbed, saved to
    folder."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tied, max_position_embeddings=64)
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
    with pytest.raises(ValueError, match=r"wrongly shaped tensor: "
                                         r"model.layers.0.self_attn.k_proj.weight \(16, 32\) "
                                         r"-> layers.0.attn.wq.weight"):
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
    assert "missing tensor: model.layers.1.mlp.up_proj.weight" in str(e.value)
    assert "unexpected tensor: model.layers.0.self_attn.q_proj.bias" in str(e.value)


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
    cfg = LLaMAConfig(**{**dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                hidden_dim=48, max_seq_len=64), **kw})
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


# ---- the whole model

from model import LoRALinear, MiniGPT, MiniGPTConfig  # noqa: E402
from vision import QFormerConfig, ViTConfig  # noqa: E402

BOS, BOX, BOX_END, EOS, PAD, LOC0, BINS = 1, 57, 56, 2, 0, 40, 16


def tiny_cfg(n_images=3, fusion="per-image", max_boxes=2, **kw):
    n_slots = 1 if fusion == "early" else n_images
    # <Img1><ImageHere></Img1>... where is the tumor? <box>, as fake ids: chunk 0 starts with BOS,
    # the last ends with <box>
    chunks = [[BOS, 5, 6]] + [[7 + k, 8 + k] for k in range(n_slots - 1)] + [[20, 21, 22, BOX]]
    return MiniGPTConfig(
        vit=ViTConfig(image_size=16, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64),
        qformer=QFormerConfig(num_query=3, width=32, depth=2, heads=2, mlp_dim=64, cross_every=1,
                              vision_width=32, out_dim=32),
        llm=LLaMAConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
                        max_seq_len=64),
        n_images=n_images, fusion=fusion, prompt_chunks=chunks, num_bins=BINS, loc_start=LOC0,
        box_end_id=BOX_END, eos_id=EOS, pad_id=PAD, max_boxes=max_boxes, **kw)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return MiniGPT(tiny_cfg(**kw)).eval()


def batch(B=2, N=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, N, 3, 16, 16, generator=g)
    # one box for sample 0, two for sample 1; padded to 4 * max_boxes + 2
    answer = torch.tensor([[LOC0 + 1, LOC0 + 2, LOC0 + 9, LOC0 + 11,
                            BOX_END, EOS, PAD, PAD, PAD, PAD],
                           [LOC0 + 3, LOC0 + 0, LOC0 + 7, LOC0 + 5,
                            LOC0 + 8, LOC0 + 8, LOC0 + 15, LOC0 + 12, BOX_END, EOS]])
    return images[:B], answer[:B], answer[:B] != PAD


@pytest.mark.parametrize("fusion", ["per-image", "early"])
def test_image_embeddings_land_in_their_slots(fusion):
    m = tiny_model(fusion=fusion)
    images, answer, _ = batch()
    cfg, Q = m.cfg, 3
    with torch.no_grad():
        img = m.encode_images(images)  # (B, n_slots, Q, dim)
        assert img.shape == (2, cfg.n_slots, Q, 32)
        # one batched ViT pass gives what each image alone gives
        vit = [m.vit(images[:, k]) for k in range(3)]
        expect = ([m.qformer(v) for v in vit] if fusion == "per-image"
                  else [m.qformer(torch.cat(vit, 1))])
        for k, e in enumerate(expect):
            assert torch.allclose(img[:, k], e, atol=1e-5)
        tail = m.llm.tok_embeddings(answer)
        x = m.splice_images(img, tail)
    assert x.shape == (2, m.prompt_len + answer.shape[1], 32)
    # walk the expected layout [text_0, img_1, text_1, ..., img_n, text_n, answer]
    pos, emb = 0, m.llm.tok_embeddings.weight
    for k, chunk in enumerate(cfg.prompt_chunks):
        assert torch.equal(x[:, pos:pos + len(chunk)], emb[chunk].expand(2, -1, -1))
        pos += len(chunk)
        if k < cfg.n_slots:
            assert pos == m.slot_starts[k]
            assert torch.equal(x[:, pos:pos + Q], img[:, k])
            pos += Q
    assert pos == m.prompt_len
    assert torch.equal(x[:, pos:], tail)


def test_loss_is_cross_entropy_on_answer_tokens_only():
    m = tiny_model()
    images, answer, mask = batch()
    with torch.no_grad():
        loss = m(images, answer, mask)
        # hand: full logits over the whole sequence, position P-1+j predicts answer[:, j]
        x = m.splice_images(m.encode_images(images), m.llm.tok_embeddings(answer))
        logp = m.llm.logits(m.llm(x, torch.arange(x.shape[1]))).log_softmax(-1)
        P = m.prompt_len
        terms = [-logp[b, P - 1 + j, answer[b, j]] for b in range(2)
                 for j in range(answer.shape[1]) if mask[b, j]]
        assert len(terms) == 6 + 10
        assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-5)
        # padding tokens (mask False) may be anything
        junk = answer.masked_fill(~mask, 33)
        assert torch.equal(m(images, junk, mask), loss)
        # masking an answer token removes exactly its term
        mask2 = mask.clone()
        mask2[1, 9] = False
        assert torch.allclose(m(images, answer, mask2), torch.stack(terms[:-1]).mean(), atol=1e-5)


def test_loss_reaches_every_trainable_part():
    m = tiny_model().train()
    m(*batch()).backward()
    for name in ("vit.patch_embed.weight", "qformer.query", "qformer.proj.weight",
                 "llm.layers.0.attn.wq.weight", "llm.tok_embeddings.weight"):
        assert m.get_parameter(name).grad.abs().sum() > 0, name


def test_freeze_flags():
    m = tiny_model(lora_rank=2)
    m.freeze(vit=True, qformer=True, llm=True)
    trained = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trained == {"qformer.proj.weight", "qformer.proj.bias", "llm.tok_embeddings.weight",
                       "llm.output.weight"} | {f"llm.layers.{i}.attn.{w}.lora_{ab}"
                                               for i in range(2) for w in ("wq", "wv")
                                               for ab in "ab"}
    m.train()
    m(*batch()).backward()
    assert all(p.grad is None for p in m.vit.parameters())
    assert m.llm.layers[0].attn.wq.lora_a.grad is not None


def naive_generate(m, images, min_boxes=1):
    """The same greedy grammar, recomputing the whole sequence at every step (no cache)."""
    B, n = images.shape[0], 4 * m.cfg.max_boxes
    img = m.encode_images(images)
    tokens, out, done = [], [], torch.zeros(B, dtype=torch.bool)
    for t in range(n):
        tail = m.llm.tok_embeddings(torch.stack(tokens, 1)) if tokens else None
        x = m.splice_images(img, tail)
        logits = m.llm.logits(m.llm(x, torch.arange(x.shape[1]))[:, -1])
        token, bins, done = m.grammar_step(logits, t, done, min_boxes)
        tokens.append(token)
        out.append(bins)
    return torch.stack(out, 1)


def parses(row, max_boxes, min_boxes=1):
    """A valid answer: k complete groups of 4 bins (min_boxes <= k <= max_boxes), then only -1."""
    row = row.tolist()
    k = sum(b >= 0 for b in row)
    return (k % 4 == 0 and min_boxes <= k // 4 <= max_boxes and all(0 <= b < BINS for b in row[:k])
            and all(b == -1 for b in row[k:]))


def end_favoured(m, shift):
    """Make </box> compete with the location tokens: its head row is a loc row plus `shift`."""
    with torch.no_grad():
        m.llm.output.weight[BOX_END] = m.llm.output.weight[LOC0 + 3] + shift


@pytest.mark.parametrize("fusion", ["per-image", "early"])
def test_generate_with_cache_equals_recomputation_and_parses(fusion):
    m = tiny_model(fusion=fusion, max_boxes=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # away from the init, so answers differ between samples
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    end_favoured(m, torch.randn(32, generator=torch.Generator().manual_seed(1)))
    images = torch.randn(8, 3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    out = m.generate(images)
    assert out.shape == (8, 12) and out.dtype == torch.long
    with torch.no_grad():
        assert torch.equal(out, naive_generate(m, images))
    assert all(parses(r, 3) for r in out)
    # the case is not trivial: answers of several lengths, different boxes
    assert len({int((r >= 0).sum()) for r in out}) > 1 and len({tuple(r.tolist()) for r in out}) > 4
    # a second call reuses the cache with another batch size
    assert torch.equal(m.generate(images[:3]), out[:3])


def test_generate_grammar_limits():
    m = tiny_model(max_boxes=2)
    images = batch()[0]

    def end_bias(b):  # shift the </box> logit by b everywhere
        m.llm.logits = lambda h: LLaMA.logits(m.llm, h) + b * F.one_hot(torch.tensor(BOX_END), 61)

    end_bias(-1e4)  # </box> never wins: max_boxes groups, then the forced end
    out = m.generate(images)
    assert (out >= 0).all() and all(parses(r, 2) for r in out)
    # </box> always wins where allowed: after the first group, or at once with min_boxes=0
    end_bias(1e4)
    assert (m.generate(images)[:, :4] >= 0).all() and (m.generate(images)[:, 4:] == -1).all()
    assert (m.generate(images, min_boxes=0) == -1).all()


def test_lora_merged_equals_unmerged():
    m = tiny_model(lora_rank=4, lora_alpha=8.0)
    wv = m.llm.layers[1].attn.wv
    assert isinstance(wv, LoRALinear) and isinstance(m.llm.layers[1].attn.wq, LoRALinear)
    x = torch.randn(5, 32)
    with torch.no_grad():
        wv.lora_b.normal_()
        assert torch.allclose(wv(x), x @ wv.weight.T + 8.0 / 4 * (x @ wv.lora_a.T @ wv.lora_b.T),
                              atol=1e-5)
    images, answer, mask = batch()
    with torch.no_grad():
        base = m(images, answer, mask)
        for name, p in m.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
        unmerged = m(images, answer, mask)
        assert (unmerged - base).abs() > 1e-3  # the adapters do something
        gen = m.generate(images)
        m.merge_lora()
        assert not any("lora_" in n for n, _ in m.named_parameters()) and m.cfg.lora_rank == 0
        assert torch.allclose(m(images, answer, mask), unmerged, rtol=1e-5)
        assert torch.equal(m.generate(images), gen)


@pytest.mark.parametrize("kw", [dict(), dict(lora_rank=2, fusion="early"), dict(tie=True),
                                dict(box_head="regress")])
def test_save_load_round_trip(tmp_path, kw):
    tie = kw.pop("tie", False)
    cfg = tiny_cfg(**kw)
    cfg.llm.tie_embeddings = tie
    torch.manual_seed(0)
    m = MiniGPT(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)  # lora_b too, so it is not all zeros
    m.save_pretrained(tmp_path, extra={"modalities": ["a", "b", "c"]})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["meta"] == {"modalities": ["a", "b", "c"]}
    r = MiniGPT.from_checkpoint(tmp_path).eval()
    assert r.cfg == m.cfg
    assert (r.llm.output.weight is r.llm.tok_embeddings.weight) == tie
    images, answer, mask = batch()
    with torch.no_grad():
        assert torch.equal(r(images, answer, mask), m(images, answer, mask))
    assert torch.equal(r.generate(images), m.generate(images))
    for a, b in zip(r.answer_boxes(images), m.answer_boxes(images)):
        assert torch.equal(a, b)


def test_loc_smoothing_loss_by_hand():
    images, answer, mask = batch()
    m = tiny_model(loc_sigma=1.5)
    with torch.no_grad():
        loss = m(images, answer, mask)
        x = m.splice_images(m.encode_images(images), m.llm.tok_embeddings(answer))
        logp = m.llm.logits(m.llm(x, torch.arange(x.shape[1]))).log_softmax(-1)
        P, terms = m.prompt_len, []
        for b in range(2):
            for j in range(answer.shape[1]):
                if not mask[b, j]:
                    continue
                t, lp = answer[b, j].item(), logp[b, P - 1 + j]
                if LOC0 <= t < LOC0 + BINS:  # a Gaussian over the bins around the true one
                    w = torch.tensor([math.exp(-0.5 * ((k - (t - LOC0)) / 1.5) ** 2)
                                      for k in range(BINS)])
                    terms.append(-(w / w.sum() * lp[LOC0:LOC0 + BINS]).sum())
                else:
                    terms.append(-lp[t])
        assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-5)
        # a very narrow Gaussian is the one-hot cross-entropy
        sharp = tiny_model(loc_sigma=1e-3)
        assert torch.allclose(sharp(images, answer, mask), tiny_model()(images, answer, mask),
                              atol=1e-6)
    m(images, answer, mask).backward()  # non-location targets must not put NaN into the gradient
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_generalized_iou_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    # 1: inter 1, union 7, hull 9 -> 1/7 - 2/9; 2: apart, union 2, hull 3 -> -1/3;
    # 3: same box, corners swapped -> 1
    torch.testing.assert_close(generalized_iou(a, b), torch.tensor([1 / 7 - 2 / 9, -1 / 3, 1.0]))


def test_regress_head_trains_and_answers():
    images, answer, mask = batch()
    m = tiny_model(box_head="regress").train()
    target = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.9, 0.8]])
    token_loss = MiniGPT.forward(tiny_model(), images, answer, mask)  # same seed, same weights
    loss = m(images, answer, mask, target)
    with torch.no_grad():
        x = m.splice_images(m.encode_images(images))
        # the hidden state at <box>
        pred = m.box_mlp(m.llm(x, torch.arange(x.shape[1]))[:, -1]).sigmoid()
    extra = (pred - target).abs().mean() + (1 - generalized_iou(pred, target)).mean()
    assert torch.allclose(loss, token_loss + extra, atol=1e-5)
    loss.backward()
    assert (m.box_mlp[0].weight.grad.abs().sum() > 0
            and m.vit.patch_embed.weight.grad.abs().sum() > 0)
    boxes, p = m.eval().answer_boxes(images)
    with torch.no_grad():
        torch.testing.assert_close(
            p, m.presence(m.llm.logits(m.llm(x, torch.arange(x.shape[1]))[:, -1])))
    assert (boxes.shape == (2, 4) and (boxes[:, :2] <= boxes[:, 2:]).all()
            and ((0 <= boxes) & (boxes <= 1)).all())
    assert torch.allclose(boxes, torch.cat([torch.minimum(pred[:, :2], pred[:, 2:]),
                                            torch.maximum(pred[:, :2], pred[:, 2:])], 1), atol=1e-6)


def test_answer_boxes_reads_the_first_answered_box():
    m = tiny_model()
    images, _, _ = batch()
    bins = m.generate(images)[:, :4].float()
    expect = (bins + 0.5) / BINS
    expect = torch.cat([torch.minimum(expect[:, :2], expect[:, 2:]),
                        torch.maximum(expect[:, :2], expect[:, 2:])], 1)
    boxes, p = m.answer_boxes(images)
    torch.testing.assert_close(boxes, expect)
    # the tumour probability: the location tokens' share at <box>, beside </box>
    with torch.no_grad():
        logits = m.llm.logits(m.llm(m.splice_images(m.encode_images(images)),
                                    torch.arange(m.prompt_len))[:, -1])
    loc = logits[:, LOC0: LOC0 + BINS].exp().sum(-1)
    torch.testing.assert_close(p, loc / (loc + logits[:, BOX_END].exp()))


def test_no_tumour_weighs_end_against_all_locations_together():
    """Between groups the grammar chooses a branch: `</box>` wins only over the location tokens'
    summed probability. 16 equal location logits 0 sum to log 16 = 2.77 in logits: an end logit of 2
    beats each one but not their sum; 3 beats the sum."""
    m = tiny_model()
    logits = torch.full((2, 61), -30.0)
    logits[:, LOC0: LOC0 + BINS] = 0.0
    logits[:, BOX_END] = torch.tensor([2.0, 3.0])
    token, bins, done = m.grammar_step(logits, 0, torch.zeros(2, dtype=torch.bool), min_boxes=0)
    assert done.tolist() == [False, True] and token[1] == BOX_END and bins[1] == -1 and bins[0] == 0
    torch.testing.assert_close(m.presence(logits),
                               torch.tensor([16 / (16 + math.exp(2)), 16 / (16 + math.exp(3))]))
    _, _, done = m.grammar_step(logits, 0, torch.zeros(2, dtype=torch.bool), min_boxes=1)
    assert not done.any()  # min_boxes=1: a box, whatever </box> says


def test_regress_loss_counts_only_rows_with_a_box():
    """A "no tumour" row (`</box>` first) teaches its tokens only: the box head's L1 + GIoU is the
    mean over the rows with a box, whatever box tensor the empty row carries."""
    images, answer, mask = batch()
    answer[0] = torch.tensor([BOX_END, EOS] + [PAD] * 8)
    mask = answer != PAD
    target = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.3, 0.3, 0.9, 0.8]])
    m = tiny_model(box_head="regress").train()
    token_loss = MiniGPT.forward(tiny_model(), images, answer, mask)  # same seed, same weights
    loss = m(images, answer, mask, target)
    with torch.no_grad():
        x = m.splice_images(m.encode_images(images))
        pred = m.box_mlp(m.llm(x, torch.arange(x.shape[1]))[1:, -1]).sigmoid()  # row 1 only
    extra = (pred - target[1:]).abs().mean() + (1 - generalized_iou(pred, target[1:])).mean()
    assert torch.allclose(loss, token_loss + extra, atol=1e-5)
    # no row with a box: tokens only
    assert torch.isfinite(m(images[:1], answer[:1], mask[:1], target[:1]))


@pytest.mark.parametrize("box_head", ["tokens", "regress"])
def test_flip_average_answers_a_mirrored_study_with_the_mirrored_box(box_head):
    m = tiny_model(box_head=box_head).eval()
    with torch.no_grad():  # away from the near-constant init, so answers depend on the image
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    images, _, _ = batch()
    mirror = lambda b: torch.stack([1 - b[:, 2], b[:, 1], 1 - b[:, 0], b[:, 3]], 1)
    (plain, p_plain), (flipped, p_flipped) = m.answer_boxes(images), m.answer_boxes(images.flip(-1))
    # a model that is not symmetric by itself
    assert not torch.allclose(flipped, mirror(plain), atol=1e-3)
    assert not torch.allclose(p_plain, p_flipped, atol=1e-4)
    m.cfg.flip_average = True
    both, p_both = m.answer_boxes(images)
    torch.testing.assert_close(both, (plain + mirror(flipped)) / 2)
    torch.testing.assert_close(p_both, (p_plain + p_flipped) / 2)
    again, p_again = m.answer_boxes(images.flip(-1))
    torch.testing.assert_close(again, mirror(both))
    torch.testing.assert_close(p_again, p_both)


def test_config_json_round_trip():
    cfg = tiny_cfg(fusion="early", lora_rank=3)
    again = MiniGPTConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again.vit, ViTConfig) and isinstance(again.llm, LLaMAConfig)
    with pytest.raises(ValueError, match="unknown MiniGPTConfig keys: \\['colour'\\]"):
        MiniGPTConfig.from_dict({**cfg.to_dict(), "colour": 1})


def test_user_errors():
    cfg = tiny_cfg()
    cfg.prompt_chunks = cfg.prompt_chunks[:-1]
    with pytest.raises(ValueError, match="prompt_chunks has 3 chunks; 3 image slot"):
        MiniGPT(cfg)
    m = tiny_model()
    with pytest.raises(ValueError, match="got 2 images per sample, the model was built for 3"):
        m.encode_images(torch.zeros(1, 2, 3, 16, 16))
    cfg = tiny_cfg()
    cfg.llm.vocab_size = 50
    with pytest.raises(ValueError, match="do not fit the LLM's vocabulary of 50"):
        MiniGPT(cfg)


def test_build_with_pretrained_llm(tmp_path):
    hf = hf_llama(tmp_path, tied=True)
    cfg = tiny_cfg()
    # the tokenizer's size; the rest comes from the checkpoint
    cfg.llm = LLaMAConfig(vocab_size=100)
    m = MiniGPT.build(cfg, llm_folder=tmp_path).eval()
    assert m.cfg.llm.vocab_size == 100 and m.cfg.llm.dim == 32 and m.cfg.llm.n_kv_heads == 2
    assert m.cfg.qformer.out_dim == 32 and m.llm.output.weight is m.llm.tok_embeddings.weight
    ids = torch.arange(9)[None] * 3
    with torch.no_grad():
        assert rel_err(our_logits(m.llm, ids)[..., :97], hf(ids).logits) <= 1e-4
    assert m.generate(batch()[0]).shape == (2, 8)
    cfg.llm = LLaMAConfig(vocab_size=90)
    with pytest.raises(ValueError, match="fewer than the checkpoint's vocabulary of 97"):
        MiniGPT.build(cfg, llm_folder=tmp_path)


def math_sdpa(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
    """SDPA as explicit matmuls, so FlopCounterMode counts attention on every backend."""
    if enable_gqa:  # query head h reads key/value head h // (heads / kv heads)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    att = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    if attn_mask is not None:
        att = att.masked_fill(~attn_mask, float("-inf"))
    return att.softmax(-1) @ v


@pytest.mark.parametrize("fusion", ["per-image", "early", "recipe", "heavy"])
@pytest.mark.parametrize("frozen", [(), ("vit", "qformer"), ("vit", "qformer", "llm"), ("vit",),
                                    ("llm",)])
def test_flops_per_sample_matches_flop_counter(monkeypatch, fusion, frozen):
    """"recipe": the from-scratch CPU recipe's parts, a conv stem, pooled queries and the patch
    loss on 2 x 2 cells per patch; "heavy": the same with the CNN stem and one cell per patch."""
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(F, "scaled_dot_product_attention", math_sdpa)
    if fusion in ("recipe", "heavy"):
        cfg = tiny_cfg(patch_loss=1.0, patch_cells=2 if fusion == "recipe" else 1)
        cfg.vit.stem = "conv" if fusion == "recipe" else "cnn"
        cfg.qformer.pooled_queries, cfg.qformer.num_query = True, 4
        torch.manual_seed(0)
        m = MiniGPT(cfg).train()
    else:
        m = tiny_model(fusion=fusion).train()
    m.freeze(**{k: True for k in frozen})
    counter = FlopCounterMode(display=False)
    with counter:
        m(*batch(B=1), boxes=torch.tensor([[0.1, 0.2, 0.6, 0.7]])).backward()
    assert m.flops_per_sample() == counter.get_total_flops()
    counter = FlopCounterMode(display=False)
    with counter:
        m(*batch(B=1), boxes=torch.tensor([[0.1, 0.2, 0.6, 0.7]]))
    assert m.flops_per_sample(train=False) == counter.get_total_flops()


def test_build_with_pretrained_blip2_and_llama(tmp_path, tiny_blip2):
    """MiniGPT-4's own setup: BLIP-2's ViT and Q-Former (its projection fits the LLM width) and a
    LLaMA."""
    hf_llama(tmp_path / "llm", tied=False)
    blip = tiny_blip2(tmp_path / "blip2", perturb=0.2)
    cfg = tiny_cfg()
    cfg.llm = LLaMAConfig(vocab_size=100)
    m = MiniGPT.build(cfg, vision_folder=tmp_path / "blip2", llm_folder=tmp_path / "llm").eval()
    assert (m.cfg.vit.width, m.cfg.qformer.width, m.cfg.qformer.vision_width,
            m.cfg.qformer.out_dim) == (24, 16, 24, 32)
    images = batch()[0]
    with torch.no_grad():
        ours = m.encode_images(images)  # (2, 3, 3, 32)
        ref = (blip.get_image_features(pixel_values=images.flatten(0, 1)).pooler_output
               .view(2, 3, 3, 32))
    assert rel_err(ours, ref) <= 1e-4
    m.save_pretrained(tmp_path / "ckpt")
    r = MiniGPT.from_checkpoint(tmp_path / "ckpt").eval()
    assert torch.equal(r.generate(images), m.generate(images))


def test_activation_checkpointing_gives_the_same_gradients(monkeypatch):
    images, answer, mask = batch()
    calls, real = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    grads = []
    for ckpt in (False, True):
        m = tiny_model().train()
        m.llm.grad_checkpoint = ckpt
        loss = m(images, answer, mask)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()
                                      if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    assert len(calls) == 2  # one per block of the checkpointed run, none in the plain one
    assert torch.equal(l0, l1) and g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)


def test_patch_loss_targets_the_covered_share_of_each_patch():
    """tiny_cfg's ViT: 16 px, patch 8 -> a 2 x 2 grid. A box [0.25, 0, 0.75, 0.5] covers half of
    each top patch and nothing of the bottom ones; the loss is the BCE of the patch head's logits
    against that."""
    m = tiny_model(patch_loss=1.0)
    tokens = torch.randn(1, 3, 5, 32)
    box = torch.tensor([[0.25, 0.0, 0.75, 0.5]])
    logits = m.patch_head(tokens[:, :, 1:]).squeeze(-1)  # (1, 3, 4): the class token is skipped
    share = torch.tensor([0.5, 0.5, 0.0, 0.0]).expand(1, 3, 4)
    expect = F.binary_cross_entropy_with_logits(logits, share)
    torch.testing.assert_close(m.patch_loss_of(tokens, box), expect)
    images, answer, mask = batch(B=1)
    with_aux = m(images, answer, mask, boxes=box)
    aux = m.patch_loss_of(m.vit_features(images), box)
    m.patch_head = None  # the same model without the auxiliary term
    torch.testing.assert_close(with_aux - m(images, answer, mask, boxes=box), aux)


def test_patch_cells_target_the_share_of_each_cell_of_a_patch():
    """patch_cells 2 on the 2 x 2 grid: 4 x 4 cells of 4 px. A box [0.25, 0, 0.625, 0.5] covers
    cell column 1 whole and half of column 2, in the two top rows. The top-left patch's cells
    (rows first) are [0, 1, 0, 1], the top-right's [0.5, 0, 0.5, 0], the bottom ones' none."""
    m = tiny_model(patch_loss=1.0, patch_cells=2)
    assert m.patch_head.out_features == 4
    tokens = torch.randn(1, 3, 5, 32)
    box = torch.tensor([[0.25, 0.0, 0.625, 0.5]])
    logits = m.patch_head(tokens[:, :, 1:])  # (1, 3, 4 patches, 4 cells)
    share = torch.tensor([[0, 1, 0, 1], [0.5, 0, 0.5, 0], [0, 0, 0, 0], [0, 0, 0, 0.]])
    expect = F.binary_cross_entropy_with_logits(logits, share.expand(1, 3, 4, 4))
    torch.testing.assert_close(m.patch_loss_of(tokens, box), expect)
