"""Tests for bench.py: it runs and prints its JSON lines, FLOPs equal a hand count, compiled and
eager training steps agree, and the decode paths give the boxes of a plain argmax loop. No timing is
asserted.

Compiling the tiny training step (forward and backward, inductor with gcc) took 78 s cold on 2
shared cores (8 s with a warm inductor cache), so that test runs only with MINIGPT_COMPILE_TESTS=1;
compiling the decode step took 17 s cold and always runs."""

import copy
import json
import os

import pytest
import torch

import bench
from model import MiniGPT

COMPILE_SLOW = pytest.mark.skipif(os.environ.get("MINIGPT_COMPILE_TESTS") != "1",
                                  reason="torch.compile on CPU is slow; "
                                         "set MINIGPT_COMPILE_TESTS=1 to run")


def has_transformers():
    try:
        import transformers  # noqa: F401
        return True
    except ImportError:
        return False


def test_bench_recipe_against_the_yardstick():
    """--recipe: the CPU recipe's whole training step and the yardstick CNN's, measured in one
    run for each modality count; the ratio is the yardstick's step time over ours."""
    lines = []
    records = bench.main(["--recipe", "--modalities", "1", "2", "--steps", "1", "--warmup", "0"],
                         out=lines.append)
    assert [json.loads(l) for l in lines] == records
    assert [r["modalities"] for r in records] == [1, 2]
    for r in records:
        assert r["kind"] == "recipe" and r["batch_size"] == 32 and r["image_size"] == 64
        assert r["step_s"] > 0 and r["yardstick_step_s"] > 0
        assert r["ratio"] == pytest.approx(r["yardstick_step_s"] / r["step_s"], rel=0.01, abs=1e-3)
    net = bench.yardstick(3)
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, 4)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 10


def test_bench_times_a_trained_run_folder(tmp_path):
    """--ckpt: a run folder written by train.py, timed with its own shape and weights (loaded
    through model.load_checkpoint and config.read_saved)."""
    import prepare
    from test_train import TINY, run

    demo = prepare.make_demo(tmp_path / "demo", cases=3, slices_per_case=2, seed=1)
    run("train.py", "--data", demo, "--out", tmp_path / "run", "--max-steps", 2, "--eval-every", 2,
        *TINY)
    records = bench.main(["--ckpt", str(tmp_path / "run"), "--steps", "1", "--warmup", "0",
                          "--answers", "1"], out=lambda line: None)
    shape = next(r for r in records if r["kind"] == "shape")
    assert (shape["batch_size"], shape["image_size"], shape["images_per_sample"]) == (8, 32, 4)
    assert {"train", "answer"} <= {r["kind"] for r in records}


@pytest.mark.parametrize("peer", [False, True])
def test_bench_tiny_prints_json_lines(peer):
    if peer and not has_transformers():
        pytest.skip("transformers not installed")
    lines = []
    argv = ["--shape", "tiny", "--steps", "2", "--warmup", "1", "--answers", "2",
            "--batch-size", "2"]
    records = bench.main(argv + (["--peer"] if peer else []), out=lines.append)
    assert [json.loads(l) for l in lines] == records
    by_kind = {}
    for r in records:
        by_kind.setdefault(r["kind"], []).append(r)
    assert {"peak", "shape", "loss", "train", "answer"} <= set(by_kind)
    train = by_kind["train"][0]
    for key in ("step_s", "samples_per_s", "tokens_per_s", "flops_per_step", "mfu",
                "peak_memory_mb"):
        assert train[key] > 0, key
    # train.py --cache-features: the frozen ViT's output computed beforehand
    cached = by_kind["train"][-1]
    assert cached.get("cached_vit_features") and cached["step_s"] > 0
    answer = by_kind["answer"][0]
    assert answer["latency_ms"] > 0 and len(answer["box"]) == 4
    if peer:
        assert [(r["impl"], r.get("cached_vit_features", False)) for r in by_kind["train"]] == [
            ("ours", False), ("peer", False), ("ours", True)]
        assert {r["what"] for r in by_kind["ratio"]} == {"train step", "answer latency"}
        # the peer holds our weights: the same loss and the same boxes
        loss = by_kind["loss"][0]
        assert abs(loss["ours"] - loss["peer"]) <= 1e-5 * abs(loss["ours"])
        assert next(r for r in by_kind["ratio"] if r["what"] == "answer latency")["same_boxes"]
        assert by_kind["shape"][0]["params_ours"] == by_kind["shape"][0]["params_peer"]


def test_large_shapes_build_on_meta_on_cpu():
    for shape in ("minigpt4-1b", "minigpt4-7b"):
        (r,) = bench.main(["--shape", shape, "--device", "cpu"], out=lambda line: None)
        assert r["kind"] == "skipped" and "GPU" in r["reason"]
        cfg, B = bench.shape_config(shape)
        assert r["flops_per_step"] == B * hand_flops(cfg)


# ---- FLOPs by hand


def hand_flops(cfg) -> int:
    """FLOPs of one training sample of a bench shape (frozen ViT, everything else trained), by
    listing every matmul: mm(m, k, n) = 2 m k n. Backward: a matmul whose input and weight both need
    gradients costs 2 more forwards, one whose input needs none (the Q-Former reading the frozen
    image tokens) 1 more; the frozen ViT has no backward at all (nothing before it trains)."""
    mm = lambda m, k, n: 2 * m * k * n
    v, q, l, N = cfg.vit, cfg.qformer, cfg.llm, cfg.n_images
    G = (v.image_size // v.patch_size) ** 2
    T = G + 1  # patches + class token
    vit = mm(G, 3 * v.patch_size ** 2, v.width)  # the patch embedding is a matmul over patches
    for _ in range(v.depth):
        vit += mm(T, v.width, 3 * v.width) + mm(T, v.width, v.width)  # qkv, out projection
        # scores and weighted values, summed over heads
        vit += mm(T, v.width, T) + mm(T, T, v.width)
        vit += mm(T, v.width, v.mlp_dim) + mm(T, v.mlp_dim, v.width)
    Q, w = q.num_query, q.width
    grads3 = grads2 = 0
    for i in range(q.depth):
        grads3 += mm(Q, w, 3 * w) + mm(Q, w, w) + mm(Q, w, Q) + mm(Q, Q, w)  # self-attention
        if i % q.cross_every == 0:
            # cross: q, scores, values, out
            grads3 += mm(Q, w, w) + mm(Q, w, T) + mm(Q, T, w) + mm(Q, w, w)
            grads2 += mm(T, q.vision_width, 2 * w)  # keys and values of the frozen image tokens
        grads3 += mm(Q, w, q.mlp_dim) + mm(Q, q.mlp_dim, w)
    grads3 += mm(Q, w, q.out_dim)  # to the LLM's width
    P = sum(len(c) for c in cfg.prompt_chunks) + N * Q
    L = 4 * cfg.max_boxes + 2
    S = P + L - 1  # prompt and teacher-forced answer
    kv = l.n_kv_heads * l.dim // l.n_heads
    llm = 0
    for _ in range(l.n_layers):
        llm += mm(S, l.dim, l.dim) + 2 * mm(S, l.dim, kv) + mm(S, l.dim, l.dim)  # q, k, v, o
        # full square, as the model and FlopCounterMode count it
        llm += mm(S, l.dim, S) + mm(S, S, l.dim)
        llm += 3 * mm(S, l.dim, l.hidden_dim)  # gate, up, down
    llm += mm(L, l.dim, l.vocab_size)  # the head, only where an answer token is predicted
    return N * vit + N * (3 * grads3 + 2 * grads2) + 3 * llm


def test_flops_per_step_equals_hand_count():
    cfg, B = bench.shape_config("tiny")
    (shape,) = [r for r in bench.main(["--shape", "tiny", "--no-train", "--no-answer",
                                       "--batch-size", "3"],
                                      out=lambda line: None) if r["kind"] == "shape"]
    assert shape["flops_per_step"] == 3 * hand_flops(cfg)
    # a full-sequence count (head at every position) gives about 107 TFLOP per step at minigpt4-1b;
    # ours leaves out the head at prompt positions, so a little less
    cfg, B = bench.shape_config("minigpt4-1b")
    assert 0.9 < B * hand_flops(cfg) / 107e12 < 1.0


# ---- compiled and eager agree


def tiny_model(seed=0):
    cfg, _ = bench.shape_config("tiny")
    torch.manual_seed(seed)
    model = MiniGPT(cfg)
    with torch.no_grad():  # away from the near-constant init, so answers differ between samples
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.freeze(vit=True)
    return model


@pytest.mark.parametrize("box_head", ["tokens", "regress"])
def test_training_forward_and_decode_step_are_single_graphs(box_head):
    """What --compile compiles traces as one graph with no breaks (dynamo's explain: tracing only,
    no code generation, so it is quick): the training forward (images or cached ViT tokens) and the
    decode step."""
    cfg, _ = bench.shape_config("tiny")
    cfg.box_head = box_head
    torch.manual_seed(0)
    model = MiniGPT(cfg).train()
    model.freeze(vit=True)
    images, answer, mask = bench.random_batch(cfg, 2, "cpu")
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.9, 0.8]])
    feats = model.vit_features(images)
    for args in [(images, answer, mask, boxes), (None, answer, mask, boxes, feats)]:
        torch._dynamo.reset()
        e = torch._dynamo.explain(model)(*args)
        assert (e.graph_count, e.graph_break_count) == (1, 0), e.break_reasons
    model.eval()
    model.llm.setup_cache(2, model.prompt_len + 4, torch.float32, torch.device("cpu"))
    torch._dynamo.reset()
    e = torch._dynamo.explain(model.decode_step)(torch.tensor([5, 6]),
                                                 torch.tensor([model.prompt_len]))
    assert (e.graph_count, e.graph_break_count) == (1, 0), e.break_reasons
    torch._dynamo.reset()


@COMPILE_SLOW
def test_compiled_and_eager_training_steps_agree():
    eager = tiny_model().train()
    compiled = copy.deepcopy(eager)
    batch = bench.random_batch(eager.cfg, 2, "cpu")
    step_e = bench.make_train_step(eager, torch.device("cpu"), bf16=False, compile=False)
    step_c = bench.make_train_step(compiled, torch.device("cpu"), bf16=False, compile=True)
    for i in range(3):  # the later steps run on weights after AdamW updates
        le, lc = step_e(*batch), step_c(*batch)
        assert torch.allclose(le, lc, rtol=1e-5), (i, le, lc)
        # the same gradients (clipped); not the same weights later: Adam's 1/sqrt(v) turns
        # float noise in near-zero gradients into steps of up to lr
        if i == 0:
            for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
                if a.requires_grad:
                    # inductor reorders sums
                    assert (a.grad - b.grad).abs().max() <= 1e-3 * a.grad.abs().max() + 1e-7, name
                else:
                    assert a.grad is None and b.grad is None, name


# ---- decoding


@torch.no_grad()
def plain_boxes(model, images):
    """One box by the plainest loop: recompute the whole sequence for every token, argmax over the
    location tokens (the grammar of a one-box answer: four locations, then `</box>`)."""
    cfg = model.cfg
    img = model.encode_images(images)
    tokens = []
    for _ in range(4):
        tail = model.llm.tok_embeddings(torch.stack(tokens, 1)) if tokens else None
        x = model.splice_images(img, tail)
        logits = model.llm.logits(model.llm(x, torch.arange(x.shape[1]))[:, -1])
        tokens.append(cfg.loc_start
                      + logits[:, cfg.loc_start: cfg.loc_start + cfg.num_bins].argmax(-1))
    return torch.stack(tokens, 1) - cfg.loc_start


def test_generate_equals_plain_loop():
    model = tiny_model().eval()
    images = bench.random_batch(model.cfg, 6, "cpu", seed=3)[0]
    out = model.generate(images)
    expect = plain_boxes(model, images)
    assert torch.equal(out, expect)
    assert len({tuple(r) for r in expect.tolist()}) > 1  # not one answer for everything


def test_compiled_decode_equals_plain_loop():
    model = tiny_model().eval()
    images = bench.random_batch(model.cfg, 6, "cpu", seed=3)[0]
    model.compile_decode()
    assert torch.equal(model.generate(images), plain_boxes(model, images))
    # another batch size
    assert torch.equal(model.generate(images[:1]), plain_boxes(model, images[:1]))
