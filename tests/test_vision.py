"""vision.py: ViT and Q-Former parity with Hugging Face transformers (test-only oracle) on tiny
random checkpoints saved as whole models; strict loading errors; position-embedding interpolation;
shards."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from vision import (
    CheckpointError,
    ConvStem,
    QFormer,
    QFormerConfig,
    ViT,
    ViTConfig,
    load_mapped,
    load_safetensors,
    resize_pos_embed,
    safetensors_index,
)



def hf_lib():
    """transformers is the test-only oracle; tests that need it skip without it."""
    return pytest.importorskip("transformers")


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def perturb(model, seed=0):
    """Hugging Face's inits are near-constant (zero biases, unit norms, 1e-10 EVA weights) and would
    hide mapping mistakes: add noise to every parameter, scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2 and "embedding" not in name and "query_tokens" not in name:
            std = p[0].numel() ** -0.5  # fan-in
        else:
            std = 0.5 if ("embedding" in name or "query_tokens" in name) else 0.2
        p.add_(torch.randn(p.shape, generator=g) * std)


def images(n, size, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# the vision tower of every tiny checkpoint here (BLIP-2, CLIP, SigLIP)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)


def blip2_config(cross_attention_frequency=2, depth=2):
    return hf_lib().Blip2Config(
        vision_config=VISION,
        qformer_config=dict(hidden_size=32, num_hidden_layers=depth, num_attention_heads=4,
                            intermediate_size=48,
                            cross_attention_frequency=cross_attention_frequency,
                            encoder_hidden_size=32, vocab_size=100, max_position_embeddings=32),
        text_config=dict(model_type="opt", hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                         num_attention_heads=2, vocab_size=100, word_embed_proj_dim=16,
                         max_position_embeddings=64),
        num_query_tokens=4,
    )


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    """A whole tiny BLIP-2 (vision, Q-Former with cross-attention in layers 0 and 2, OPT) saved as
    safetensors."""
    torch.manual_seed(0)
    config = blip2_config(cross_attention_frequency=2, depth=3)
    hf = hf_lib().Blip2ForConditionalGeneration(config).eval()
    perturb(hf)
    folder = tmp_path_factory.mktemp("blip2")
    hf.save_pretrained(folder)
    return hf, folder


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    torch.manual_seed(0)
    cfg = hf_lib().CLIPConfig(
        vision_config=VISION,
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=50, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        projection_dim=8,
    )
    hf = hf_lib().CLIPModel(cfg).eval()
    perturb(hf)
    folder = tmp_path_factory.mktemp("clip")
    hf.save_pretrained(folder)
    return hf, folder


# --- parity -------------------------------------------------------------------------------------


def test_blip2_vit_parity(blip2):
    hf, folder = blip2
    vit = ViT.from_pretrained(folder).eval()
    c = vit.cfg
    assert c.class_token and c.final_norm and not c.pre_norm and c.act == "gelu"
    x = images(2, 32)
    with torch.no_grad():
        ours, ref = vit(x), hf.vision_model(pixel_values=x).last_hidden_state
    assert ours.shape == ref.shape == (2, 17, 32)
    assert rel_err(ours, ref) <= 1e-4


def test_blip2_qformer_parity(blip2):
    hf, folder = blip2
    qf = QFormer.from_pretrained(folder, out_dim=16).eval()  # OPT's width: language_projection fits
    assert [layer.cross is not None for layer in qf.layers] == [True, False, True]
    img = torch.randn(2, 17, 32)
    with torch.no_grad():
        queries = hf.query_tokens.expand(2, -1, -1)
        ref = hf.qformer(query_embeds=queries, encoder_hidden_states=img).last_hidden_state
        feats = qf.forward_features(img)
        assert feats.shape == ref.shape == (2, 4, 32)
        assert rel_err(feats, ref) <= 1e-4
        assert rel_err(qf(img), hf.language_projection(ref)) <= 1e-4


def test_blip2_end_to_end_parity(blip2):
    """ViT -> Q-Former -> projection equals BLIP-2's get_image_features (the LLM's inputs)."""
    hf, folder = blip2
    vit, qf = ViT.from_pretrained(folder).eval(), QFormer.from_pretrained(folder, out_dim=16).eval()
    x = images(2, 32, seed=3)
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=x).pooler_output
        assert rel_err(qf(vit(x)), ref) <= 1e-4


def test_qformer_projection_kept_fresh_when_width_differs(blip2):
    hf, folder = blip2
    qf = QFormer.from_pretrained(folder, out_dim=24)
    assert qf.proj.weight.shape == (24, 32)
    assert torch.equal(qf.query, hf.query_tokens)  # everything else still loaded


def test_qformer_cross_attention_every_layer(tmp_path):
    torch.manual_seed(0)
    hf = hf_lib().Blip2ForConditionalGeneration(blip2_config(cross_attention_frequency=1)).eval()
    perturb(hf)
    hf.save_pretrained(tmp_path)
    qf = QFormer.from_pretrained(tmp_path, out_dim=16).eval()
    assert all(layer.cross is not None for layer in qf.layers)
    img = torch.randn(3, 17, 32)
    with torch.no_grad():
        queries = hf.query_tokens.expand(3, -1, -1)
        ref = hf.qformer(query_embeds=queries, encoder_hidden_states=img).last_hidden_state
        assert rel_err(qf.forward_features(img), ref) <= 1e-4


def test_clip_vit_parity(clip):
    hf, folder = clip
    vit = ViT.from_pretrained(folder).eval()
    c = vit.cfg
    assert c.pre_norm and not c.final_norm and not c.patch_bias and c.act == "quick_gelu"
    x = images(2, 32)
    with torch.no_grad():
        out = hf.vision_model(pixel_values=x)
        ours = vit(x)
    assert ours.shape == out.last_hidden_state.shape == (2, 17, 32)
    assert rel_err(ours, out.last_hidden_state) <= 1e-4
    # CLIP's post_layernorm is on the pooled token only: on our class token it gives pooler_output
    pooled = hf.vision_model.post_layernorm(ours[:, 0])
    assert rel_err(pooled, out.pooler_output) <= 1e-4


def test_siglip_vit_parity(tmp_path):
    torch.manual_seed(0)
    cfg = hf_lib().SiglipConfig(
        vision_config=VISION,
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=50),
    )
    hf = hf_lib().SiglipModel(cfg).eval()
    perturb(hf)
    hf.save_pretrained(tmp_path)
    vit = ViT.from_pretrained(tmp_path).eval()
    assert not vit.cfg.class_token and vit.cfg.final_norm
    x = images(2, 32)
    with torch.no_grad():
        ours, ref = vit(x), hf.vision_model(pixel_values=x).last_hidden_state
    assert ours.shape == ref.shape == (2, 16, 32)
    assert rel_err(ours, ref) <= 1e-4


@pytest.mark.parametrize("which", ["blip2", "clip"])
def test_interpolated_position_embeddings_match_hf(which, blip2, clip):
    """Loading at another image size equals HF's interpolate_pos_encoding=True at that size."""
    hf, folder = {"blip2": blip2, "clip": clip}[which]
    vit = ViT.from_pretrained(folder, image_size=48).eval()
    assert vit.pos_embed.shape == (1, 1 + 36, 32)
    x = images(2, 48)
    with torch.no_grad():
        ref = hf.vision_model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        assert rel_err(vit(x), ref) <= 1e-4


# --- position embeddings --------------------------------------------------------------------------


def test_resize_pos_embed():
    pos = torch.randn(1, 1 + 16, 8)
    assert resize_pos_embed(pos, (4, 4), class_token=True) is pos  # same grid: untouched
    big = resize_pos_embed(pos, (6, 6), class_token=True)
    assert big.shape == (1, 37, 8) and torch.equal(big[:, 0], pos[:, 0])  # class entry kept
    # bicubic, align_corners=False: going up then back to the checkpoint grid recovers it closely
    back = resize_pos_embed(resize_pos_embed(pos, (16, 16), True), (4, 4), True)
    assert rel_err(back, pos) < 0.05
    assert resize_pos_embed(torch.randn(1, 16, 8), (2, 3), class_token=False).shape == (1, 6, 8)
    # a constant field stays constant (interpolation weights sum to 1)
    const = torch.ones(1, 16, 8)
    big = resize_pos_embed(const, (7, 7), class_token=False)
    assert torch.allclose(big, torch.ones(1, 49, 8), atol=1e-5)


def test_vit_other_input_size_interpolates_on_the_fly():
    vit = ViT(ViTConfig(image_size=32, patch_size=8, width=16, depth=1, heads=2, mlp_dim=32)).eval()
    with torch.no_grad():
        assert vit(images(1, 32)).shape == (1, 17, 16)
        assert vit(torch.randn(1, 3, 40, 24)).shape == (1, 1 + 15, 16)
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        vit(images(1, 30))


def test_same_size_load_is_identity(blip2):
    hf, folder = blip2
    a, b = ViT.from_pretrained(folder), ViT.from_pretrained(folder, image_size=32)
    assert torch.equal(a.pos_embed, hf.vision_model.embeddings.position_embedding)
    assert torch.equal(a.pos_embed, b.pos_embed)


# --- strict loading ------------------------------------------------------------------------------


def edit_checkpoint(src, dst, edit):
    """Copy a saved folder with its tensors changed by edit(dict) -> dict."""
    tensors = load_safetensors(src)
    dst.mkdir(exist_ok=True)
    save_file(edit(dict(tensors)), str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def test_missing_unexpected_and_misshaped_tensors_are_all_named(blip2, tmp_path):
    _, folder = blip2
    qkv = "vision_model.encoder.layers.1.self_attn.qkv.weight"

    def edit(t):
        del t["vision_model.post_layernorm.bias"]
        fc1 = "vision_model.encoder.layers.0.mlp.fc1.weight"
        t[fc1] = t[fc1][:, :16].contiguous()
        t["vision_model.encoder.layers.1.self_attn.qkv_renamed.weight"] = t.pop(qkv)
        t["vision_model.extra.weight"] = torch.zeros(3)
        return t

    with pytest.raises(CheckpointError) as e:
        ViT.from_pretrained(edit_checkpoint(folder, tmp_path / "bad", edit))
    msg = str(e.value)
    assert "missing tensor: vision_model.post_layernorm.bias" in msg
    assert f"missing tensor: {qkv}" in msg
    assert "wrongly shaped tensor: vision_model.encoder.layers.0.mlp.fc1.weight (64, 16)" in msg
    assert "expects (64, 32)" in msg
    assert "unexpected tensor: vision_model.encoder.layers.1.self_attn.qkv_renamed.weight" in msg
    assert "unexpected tensor: vision_model.extra.weight" in msg


def test_swapped_tensors_are_caught_or_change_the_output(blip2, tmp_path):
    """A mapping that swaps fc1/fc2 fails on shapes; swapping same-shaped norms breaks parity."""
    hf, folder = blip2
    vit = ViT.from_pretrained(folder)
    mapping = {k: k for k in vit.state_dict()}
    tensors = {k: v.clone() for k, v in vit.state_dict().items()}
    load_mapped(vit, tensors, mapping)  # identity mapping loads
    fc1, fc2 = "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight"
    swapped = mapping | {fc1: fc2, fc2: fc1}
    with pytest.raises(CheckpointError, match=rf"{fc2} \(32, 64\) -> {fc1} expects \(64, 32\)"):
        load_mapped(vit, tensors, swapped)
    norm1, norm2 = "blocks.0.norm1.weight", "blocks.0.norm2.weight"
    norms = mapping | {norm1: norm2, norm2: norm1}
    load_mapped(vit, tensors, norms)
    x = images(1, 32)
    with torch.no_grad():
        assert rel_err(vit(x), hf.vision_model(pixel_values=x).last_hidden_state) > 1e-2


def test_qformer_missing_cross_attention_is_named(blip2, tmp_path):
    _, folder = blip2
    key = "layer.2.crossattention.attention.key"
    drop = lambda t: {k: v for k, v in t.items() if key not in k}
    bad = edit_checkpoint(folder, tmp_path / "bad", drop)
    with pytest.raises(CheckpointError, match=f"missing tensor: qformer.encoder.{key}.weight"):
        QFormer.from_pretrained(bad, out_dim=16)


def test_other_architectures_are_refused(clip, tmp_path):
    llama = tmp_path / "llama"
    llama.mkdir()
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    (llama / "config.json").write_text(json.dumps(config))
    save_file({"model.embed_tokens.weight": torch.zeros(4, 2)}, str(llama / "model.safetensors"))
    message = (r"model_type 'llama' \(architectures \['LlamaForCausalLM'\]\) "
               r"is not a vision checkpoint")
    with pytest.raises(CheckpointError, match=message):
        ViT.from_pretrained(llama)
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        QFormer.from_pretrained(llama, out_dim=8)
    with pytest.raises(CheckpointError, match="Q-Former loads only from a BLIP-2 checkpoint"):
        QFormer.from_pretrained(clip[1], out_dim=8)
    with pytest.raises(CheckpointError, match="config.json: not found"):
        ViT.from_pretrained(tmp_path)


# --- safetensors shards ---------------------------------------------------------------------------


def test_load_safetensors_sharded(tmp_path):
    a, b = {"x.a": torch.randn(2, 3), "x.b": torch.randn(4)}, {"y.c": torch.arange(5.0)}
    save_file(a, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(b, str(tmp_path / "model-00002-of-00002.safetensors"))
    wm = {k: "model-00001-of-00002.safetensors" for k in a}
    wm |= {k: "model-00002-of-00002.safetensors" for k in b}
    index = {"metadata": {}, "weight_map": wm}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert set(safetensors_index(tmp_path)) == {"x.a", "x.b", "y.c"}
    got = load_safetensors(tmp_path, {"x.a", "y.c", "not.there"})
    assert set(got) == {"x.a", "y.c"}
    assert torch.equal(got["x.a"], a["x.a"]) and torch.equal(got["y.c"], b["y.c"])
    # only wanted shards are opened: a missing shard that holds nothing wanted goes unnoticed
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    assert set(load_safetensors(tmp_path, {"x.b"})) == {"x.b"}
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: shard listed in"):
        load_safetensors(tmp_path, {"y.c"})
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        safetensors_index(tmp_path / "nowhere")


def test_sharded_blip2_folder_loads_the_same(blip2, tmp_path):
    hf, folder = blip2
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a, b = ViT.from_pretrained(folder), ViT.from_pretrained(tmp_path)
    qa, qb = QFormer.from_pretrained(folder, 16), QFormer.from_pretrained(tmp_path, 16)
    for m, n in ((a, b), (qa, qb)):
        for (k, p), (_, q) in zip(m.state_dict().items(), n.state_dict().items()):
            assert torch.equal(p, q), k


# --- from scratch ---------------------------------------------------------------------------------


def test_from_scratch_shapes_and_gradients():
    vit = ViT(ViTConfig(image_size=32, patch_size=8, width=32, depth=2, heads=4, mlp_dim=64,
                        class_token=False, act="quick_gelu", pre_norm=True))
    qf = QFormer(QFormerConfig(num_query=5, width=24, depth=2, heads=4, mlp_dim=48, cross_every=2,
                               vision_width=32, out_dim=40))
    out = qf(vit(images(3, 32)))
    assert out.shape == (3, 5, 40)
    out.square().mean().backward()
    params = [*vit.parameters(), *qf.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_vision_tower_saved_alone(blip2, clip, tmp_path):
    """Blip2VisionModel / CLIPVisionModel saved on their own (config.json is the vision config) load
    too, and an old CLIP checkpoint's `position_ids` buffer is skipped, not reported."""
    x = images(1, 32)
    for name, (hf, _) in {"blip2": blip2, "clip": clip}.items():
        tower = hf.vision_model
        tower.save_pretrained(tmp_path / name)
        vit = ViT.from_pretrained(tmp_path / name).eval()
        with torch.no_grad():
            assert rel_err(vit(x), tower(pixel_values=x).last_hidden_state) <= 1e-4
    ids = {"vision_model.embeddings.position_ids": torch.arange(17)[None]}
    old = edit_checkpoint(clip[1], tmp_path / "old", lambda t: t | ids)
    ViT.from_pretrained(old)


def test_position_grid_disagreeing_with_config_is_a_shape_error(blip2, tmp_path):
    _, folder = blip2
    bad = edit_checkpoint(folder, tmp_path / "bad", lambda t: t)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vision_config"]["image_size"] = 40  # grid 5x5, but the stored embeddings are for 4x4
    (bad / "config.json").write_text(json.dumps(cfg))
    message = r"position_embedding \(1, 17, 32\) -> pos_embed expects \(1, 26, 32\)"
    with pytest.raises(CheckpointError, match=message):
        ViT.from_pretrained(bad)


def test_sincos_positions_by_hand():
    from vision import sincos_2d

    # (16, 8): channels 0-1 sin of the row (freqs 1, 0.01), 2-3 cos; 4-7 the column's
    pe = sincos_2d(4, 8)
    assert pe.shape == (16, 8)
    r, c = 1, 2
    expect = [math.sin(r), math.sin(r / 100), math.cos(r), math.cos(r / 100),
              math.sin(c), math.sin(c / 100), math.cos(c), math.cos(c / 100)]
    torch.testing.assert_close(pe[r * 4 + c], torch.tensor(expect))
    assert len({tuple(v) for v in pe.tolist()}) == 16  # every patch position has its own code
    # a from-scratch ViT starts with these codes (class token slot zero)
    vit = ViT(ViTConfig(image_size=32, patch_size=8, width=8, depth=1, heads=2, mlp_dim=16))
    torch.testing.assert_close(vit.pos_embed[0, 1:], sincos_2d(4, 8))
    assert vit.pos_embed[0, 0].abs().sum() == 0


def test_from_scratch_qformer_hears_the_image():
    # In post-norm layers the image enters as x + cross(x, img). With BERT's fixed std 0.02 at a
    # small width, cross() starts ~1% of x and training stalls; the width-scaled init keeps it a
    # sizeable share.
    torch.manual_seed(0)
    qf = QFormer(QFormerConfig(num_query=4, width=32, depth=1, heads=2, mlp_dim=64, cross_every=1,
                               vision_width=32, out_dim=32))
    img = torch.nn.functional.layer_norm(torch.randn(2, 17, 32), (32,))  # as a ViT's output
    x = qf.norm_in(qf.query.expand(2, -1, -1))
    with torch.no_grad():
        ratio = qf.layers[0].cross(x, img).norm() / x.norm()
    assert ratio > 0.1, ratio


@pytest.mark.parametrize("stem, stride", [("cnn", 1), ("conv", 1), ("conv", 2)])
def test_conv_stems_keep_the_patch_grid_and_learn(stem, stride):
    cfg = ViTConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64, stem=stem,
                    stem_stride=stride)
    vit = ViT(cfg)
    x = torch.randn(5, 3, 32, 32, requires_grad=True)
    out = vit(x)
    assert out.shape == (5, 1 + 4 * 4, 32)
    out.sum().backward()
    convs = [p for n, p in vit.named_parameters() if n.startswith("patch_embed") and p.dim() > 1]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in convs)
    with pytest.raises(ValueError, match="power-of-two patch size"):
        ViT(ViTConfig(image_size=36, patch_size=12, width=32, depth=1, heads=2, mlp_dim=64,
                      stem=stem))


def test_a_stride_2_stem_reads_twice_the_side_for_the_same_work():
    """--stem-stride 2: at 64 px with 16 px patches, the same convs on the same grids (so the same
    FLOPs) as the full-resolution stem at 32 px with 8 px patches; only the first conv's input
    differs."""
    full, half = ConvStem(3, 32, 8, light=True), ConvStem(3, 32, 16, light=True, first_stride=2)
    assert half.flops(64) == full.flops(32)
    assert (layer_shapes(half, torch.randn(2, 3, 64, 64))
            == layer_shapes(full, torch.randn(2, 3, 32, 32)))
    assert half[0].stride == (2, 2) and full[0].stride == (1, 1)
    with pytest.raises(ValueError, match="first_stride"):
        ConvStem(3, 32, 8, light=False, first_stride=2)


def test_the_cpu_recipes_stem_halves_first_with_32_channels_by_hand():
    """The CPU recipe's stem (64 px, 16 px patches, first conv stride 2 with 32 channels): its
    layers' shapes and FLOPs counted by hand; no layer at 64 x 64."""
    stem = ConvStem(3, 128, 16, light=True, first_stride=2, first_channels=32)
    convs = [m for m in stem if isinstance(m, torch.nn.Conv2d)]
    # (in, out, stride) of each conv; its output side below
    assert [(m.in_channels, m.out_channels, m.stride[0]) for m in convs] == \
        [(3, 32, 2), (32, 32, 2), (32, 64, 2), (64, 128, 2), (128, 128, 1)]
    sides = [32, 16, 8, 4, 4]
    assert stem.flops(64) == [2 * s * s * m.in_channels * m.out_channels * m.kernel_size[0] ** 2
                              for s, m in zip(sides, convs)]
    assert stem.flops(64)[0] == 2 * 32 * 32 * 3 * 32 * 9
    shapes = layer_shapes(stem, torch.randn(2, 3, 64, 64))
    assert max(s[-1] for s in shapes) == 32 and shapes[-1] == (2, 128, 4, 4)
    with pytest.raises(ValueError, match="first_channels"):
        ConvStem(3, 32, 8, light=False, first_channels=32)


def layer_shapes(stem, x):
    """The output shape of every layer of a conv stem."""
    shapes = []
    for m in stem:
        x = m(x)
        shapes.append(tuple(x.shape))
    return shapes


def test_pooled_queries_start_from_their_region():
    """pool_regions by hand: a 4 x 4 grid of tokens valued by their index, 4 queries: 2 x 2."""
    sizes = dict(width=8, depth=1, heads=2, mlp_dim=16, vision_width=8, out_dim=8,
                 pooled_queries=True)
    q = QFormer(QFormerConfig(num_query=4, **sizes))
    grid = torch.arange(16.0).view(1, 16, 1).expand(1, 16, 8)
    with_cls = torch.cat([torch.full((1, 1, 8), 99.0), grid], 1)  # a class token first is skipped
    pooled = q.pool_regions(with_cls)[0, :, 0]
    # rows 0-1 x cols 0-1: (0 + 1 + 4 + 5) / 4; then top-right, bottom-left, bottom-right regions
    assert pooled.tolist() == [2.5, 4.5, 10.5, 12.5]
    q8 = QFormer(QFormerConfig(num_query=8, **sizes))
    # 8 queries: 2 x 4 regions of 2 rows x 1 column; region (R, C) averages tokens 8R + C and
    # 8R + C + 4
    expect = [8 * R + C + 2 for R in range(2) for C in range(4)]
    assert q8.pool_regions(grid)[0, :, 0].tolist() == expect
    out1 = q(grid)
    out2 = q(grid.flip(1))  # another image: the queries hear it from the first layer on
    assert not torch.allclose(out1, out2)
