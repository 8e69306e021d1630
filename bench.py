"""
Speed of minigpt-mri, and of the same model assembled from Hugging Face `transformers` parts.

    python bench.py --shape tiny --peer                 # CPU, well under a minute
    python bench.py --shape minigpt4-1b --peer          # one GPU: EVA ViT-g + Q-Former +
                                                        # TinyLlama-1.1B, batch 32
    python bench.py --shape minigpt4-7b --peer          # one GPU: answering latency with a
                                                        # Llama-2-7B-shaped LLM

Random weights, random images; one JSON line per measurement:
- {"kind": "peak"}: the matmul rate this device reaches (bf16 8192^3 on CUDA, float32 on CPU),
  MFU's denominator;
- {"kind": "train"}: median training step (forward, backward, clip, AdamW) with samples/s,
  tokens/s, FLOPs per step (MiniGPT.flops_per_sample, ViT and Q-Former included), MFU and peak
  memory;
- {"kind": "answer"}: median latency of one query end to end: images on the host in, one box on
  the host out;
- {"kind": "ratio"}: the peer's time over ours (above 1: ours is faster).

The peer (--peer) is Blip2VisionModel + query tokens + Blip2QFormerModel + a Linear +
LlamaForCausalLM (SDPA attention), with the prompt built as MiniGPT-4 does it: query embeddings
spliced into inputs_embeds, labels -100 except on the answer, `generate` for answers. Both models
hold the same weights (ours are loaded from the peer's with the checkpoint mapping tables of
vision.py and model.py), so both compute the same loss and the same boxes: the bench prints both.
Both get the same care where it is a setting, not an implementation: the frozen ViT in bf16 under
no_grad, bf16 autocast, fused AdamW, torch.compile.
"""

import argparse
import copy
import json
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import config
import data
from config import PRESETS, Settings
from model import (LLaMAConfig, MiniGPT, MiniGPTConfig, generalized_iou, llama_mapping,
                   load_checkpoint, shape_parts, update_ema)
from vision import (QFORMER_IGNORE, QFormerConfig, ViTConfig, _ignored, load_mapped,
                    qformer_mapping, vit_mapping)

# -----------------------------------------------------------------------------
# shapes

NUM_BINS = 64
# <box> </box>, 8 image tag pairs, the location tokens
N_SPECIALS = len(data.special_tokens(NUM_BINS))


def prompt_ids(base_vocab: int, n_slots: int, text_lens: tuple[int, int, int]):
    """Stand-in prompt ids of a realistic layout (the bench needs lengths, not words):
    chunk 0 = BOS + text, n_slots - 1 middle chunks, the last ends with <box>. Our specials sit
    after the base vocabulary, in data.special_tokens order, as data.Tokenizer appends them to a
    pretrained LLaMA vocabulary."""
    first, middle, last = text_lens
    word = lambda i: 3 + i % (base_vocab - 3)  # anything but unk/BOS/EOS
    chunks = [[1] + [word(i) for i in range(first - 1)]]
    chunks += [[word(100 + 7 * k + i) for i in range(middle)] for k in range(n_slots - 1)]
    # <box> is the first special
    chunks += [[word(200 + i) for i in range(last - 1)] + [base_vocab]]
    return dict(prompt_chunks=chunks, num_bins=NUM_BINS,
                loc_start=base_vocab + N_SPECIALS - NUM_BINS, box_end_id=base_vocab + 1,
                eos_id=2, pad_id=2)


# BLIP-2 vision_config
EVA_VIT_G = dict(image_size=224, patch_size=14, width=1408, depth=39, heads=16, mlp_dim=6144)
BLIP2_QFORMER = dict(num_query=32, width=768, depth=12, heads=12, mlp_dim=3072, cross_every=2,
                     vision_width=1408)
TINYLLAMA = dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, max_seq_len=2048)
LLAMA2_7B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008,
                 max_seq_len=4096)
# text around 4 slots of 32 queries: the vicuna template ("###Human: <Img1>...</Img4> where is the
# tumor? ###Assistant: <box>") is about 36 LLaMA tokens, so prompt 164 + answer 6 - 1 = a sequence
# of 169
LLAMA_TEXT = (8, 2, 22)


def shape_config(name: str) -> tuple[MiniGPTConfig, int]:
    """-> (config, batch size). ViT frozen (set by build), everything else trained."""
    if name == "tiny":  # config.py's tiny preset: the CPU recipe's sizes in the layout the
        # transformers peer can also build (a patch embedding, plain learned queries); a small
        # vocabulary
        base, n = 256, 4
        parts = shape_parts(Settings(**PRESETS["tiny"]), base + N_SPECIALS, max_seq_len=256)
        parts["llm"].tie_embeddings = False  # a head of its own, as in the 7B shapes
        cfg = MiniGPTConfig(**parts, n_images=n, **prompt_ids(base, n, (4, 2, 8)))
        return cfg, 8
    llm = {"minigpt4-1b": TINYLLAMA, "minigpt4-7b": LLAMA2_7B}.get(name)
    if llm is None:
        raise ValueError(f"unknown shape {name!r}; expected one of {SHAPE_NAMES}")
    base, n = 32000, 4
    cfg = MiniGPTConfig(vit=ViTConfig(**EVA_VIT_G),
                        qformer=QFormerConfig(**BLIP2_QFORMER, out_dim=llm["dim"]),
                        llm=LLaMAConfig(vocab_size=base + N_SPECIALS, **llm), n_images=n,
                        **prompt_ids(base, n, LLAMA_TEXT))
    return cfg, 32


SHAPE_NAMES = ("tiny", "minigpt4-1b", "minigpt4-7b")


# -----------------------------------------------------------------------------
# the peer: the same model from transformers parts


class Peer(nn.Module):
    """MiniGPT-4 as its own code assembles it from BLIP-2 and LLaMA parts (LAVIS / minigpt4/models),
    with today's transformers classes: frozen Blip2VisionModel, query tokens + Blip2QFormerModel,
    a Linear, LlamaForCausalLM over inputs_embeds."""

    def __init__(self, cfg: MiniGPTConfig):
        super().__init__()
        import transformers as tf

        v, q, l = cfg.vit, cfg.qformer, cfg.llm
        self.cfg = cfg
        self.vision = tf.Blip2VisionModel(tf.Blip2VisionConfig(
            hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
            num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
            layer_norm_eps=v.norm_eps, hidden_act="gelu", qkv_bias=True,
            attn_implementation="sdpa"))
        self.query_tokens = nn.Parameter(torch.randn(1, q.num_query, q.width) * 0.02)
        # ours has no dropout
        self.qformer = tf.Blip2QFormerModel(tf.Blip2QFormerConfig(
            hidden_size=q.width, num_hidden_layers=q.depth, num_attention_heads=q.heads,
            intermediate_size=q.mlp_dim, cross_attention_frequency=q.cross_every,
            encoder_hidden_size=q.vision_width, layer_norm_eps=q.norm_eps, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, attn_implementation="sdpa"))
        self.language_projection = nn.Linear(q.width, l.dim)
        self.llm = tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=l.vocab_size, hidden_size=l.dim, intermediate_size=l.hidden_dim,
            num_hidden_layers=l.n_layers, num_attention_heads=l.n_heads,
            num_key_value_heads=l.n_kv_heads, rms_norm_eps=l.norm_eps, rope_theta=l.rope_theta,
            max_position_embeddings=l.max_seq_len, tie_word_embeddings=l.tie_embeddings,
            bos_token_id=1, eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id,
            attn_implementation="sdpa"))
        self.register_buffer("prompt", torch.tensor(cfg.prompt_ids), persistent=False)
        self.chunk_sizes = [len(c) for c in cfg.prompt_chunks]

    def inputs_embeds(self, images, answer=None):
        B, N = images.shape[:2]
        with torch.no_grad():  # the frozen ViT
            dtype = self.vision.embeddings.patch_embedding.weight.dtype
            # (B*N, T, W)
            img = self.vision(pixel_values=images.flatten(0, 1).to(dtype)).last_hidden_state
        img = img.to(self.query_tokens.dtype)
        query = self.qformer(query_embeds=self.query_tokens.expand(img.shape[0], -1, -1),
                             encoder_hidden_states=img).last_hidden_state
        img = self.language_projection(query).view(B, N, -1, self.cfg.llm.dim)  # (B, N, Q, dim)
        embed = self.llm.get_input_embeddings()
        chunks = embed(self.prompt).split(self.chunk_sizes)
        pieces = [chunks[0].expand(B, -1, -1)]
        for k in range(N):
            pieces += [img[:, k].to(chunks[0].dtype), chunks[k + 1].expand(B, -1, -1)]
        if answer is not None:
            pieces.append(embed(answer))
        return torch.cat(pieces, 1)  # (B, P [+ L], dim)

    def forward(self, images, answer, answer_mask):
        x = self.inputs_embeds(images, answer)
        P = x.shape[1] - answer.shape[1]
        labels = torch.cat([answer.new_full((answer.shape[0], P), -100),
                            answer.masked_fill(~answer_mask, -100)], 1)
        # transformers shifts the labels itself
        return self.llm(inputs_embeds=x, labels=labels).loss

    @torch.no_grad()
    def generate(self, images):
        """Greedy, location tokens only (4 per box: the grammar of a one-box answer) ->
        (B, 4) bins."""
        from transformers import LogitsProcessor, LogitsProcessorList

        c = self.cfg

        class LocationsOnly(LogitsProcessor):
            def __call__(self, input_ids, scores):
                allowed = torch.full_like(scores, float("-inf"))
                allowed[:, c.loc_start: c.loc_start + c.num_bins] = 0
                return scores + allowed

        n = 4 * c.max_boxes
        out = self.llm.generate(inputs_embeds=self.inputs_embeds(images), max_new_tokens=n,
                                min_new_tokens=n, do_sample=False,
                                logits_processor=LogitsProcessorList([LocationsOnly()]),
                                pad_token_id=c.pad_id)
        return out[:, -n:] - c.loc_start


def ours_from_peer(peer: Peer, device) -> MiniGPT:
    """Our model holding the peer's weights, through the mapping tables the checkpoint loaders
    use."""
    cfg = peer.cfg
    with torch.device("meta"):
        model = MiniGPT(cfg)
    model.to_empty(device=device)
    model.prompt_ids.copy_(torch.tensor(cfg.prompt_ids, device=device))
    vit_map, vit_tf = vit_mapping(cfg.vit, "blip2", "", ckpt_grid=cfg.vit.grid)
    load_mapped(model.vit, peer.vision.state_dict(), vit_map, vit_tf, source="peer vision")
    q_map, _ = qformer_mapping(cfg.qformer)
    q_map |= {"proj.weight": "language_projection.weight", "proj.bias": "language_projection.bias"}
    tensors = {"qformer." + k: t for k, t in peer.qformer.state_dict().items()
               if not _ignored("qformer." + k, QFORMER_IGNORE)}
    tensors |= {"query_tokens": peer.query_tokens.data,
                "language_projection.weight": peer.language_projection.weight.data,
                "language_projection.bias": peer.language_projection.bias.data}
    load_mapped(model.qformer, tensors, q_map, source="peer qformer")
    load_mapped(model.llm, peer.llm.state_dict(), llama_mapping(cfg.llm.n_layers),
                source="peer llm")
    return model


# -----------------------------------------------------------------------------
# measuring


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device) -> float:
    """FLOP/s of a large matmul in the dtype training runs its matmuls in: the MFU denominator."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype),
            torch.randn(n, n, device=device, dtype=dtype))
    times = []
    for i in range(13):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times[3:])


def peak_memory(device) -> int:
    """Bytes: CUDA's allocator peak since the last reset; on CPU the process's resident high-water
    mark (ru_maxrss, KiB on Linux), which never goes down: it covers everything run before too."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def random_batch(cfg: MiniGPTConfig, B: int, device, seed=0):
    """images (B, N, 3, S, S), answer and answer_mask (B, 4 * max_boxes + 2) of random boxes."""
    g = torch.Generator().manual_seed(seed)
    S = cfg.vit.image_size
    images = torch.randn(B, cfg.n_images, 3, S, S, generator=g)
    corners = torch.rand(B, cfg.max_boxes, 2, 2, generator=g).sort(dim=2).values  # x0 < x1, y0 < y1
    boxes = corners.transpose(2, 3).reshape(B, cfg.max_boxes, 4)
    answer, mask = data.answer_tokens(boxes, torch.ones(B, dtype=torch.long), cfg.num_bins,
                                      cfg.loc_start, cfg.box_end_id, cfg.eos_id, cfg.pad_id)
    return images.to(device), answer.to(device), mask.to(device)


def make_train_step(model, device, bf16: bool, compile: bool):
    """One training step as train.py takes it: autocast forward, backward, clip at 1.0, fused
    AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    except RuntimeError:  # no fused kernel for this device
        optimizer = torch.optim.AdamW(params, lr=1e-5)
    forward = torch.compile(model) if compile else model

    # feats: cached ViT output instead of images (ours only)
    def step(images, answer, mask, feats=None):
        # first, so the gradients stay readable after the step
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = (forward(images, answer, mask) if feats is None
                    else forward(None, answer, mask, None, feats))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss.detach()

    return step


def time_train(step, batch, device, steps: int, warmup: int, counter=False) -> list[float]:
    """Seconds of each timed step(*batch) (step(i) with counter=True), after warmup steps."""
    times = []
    for i in range(warmup + steps):
        sync(device)
        t = time.perf_counter()
        step(i) if counter else step(*batch)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def time_answer(generate, image, cfg, device, repeats: int, warmup: int):
    """Latency of one query: host image (1, N, 3, S, S) in, box in pixels on the host out."""
    times, box = [], None
    for i in range(warmup + repeats):
        sync(device)
        t = time.perf_counter()
        bins = generate(image.to(device)).cpu()
        box = data.bins_to_box(bins[0, :4].tolist(), cfg.vit.image_size, cfg.vit.image_size,
                               cfg.num_bins)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times, box, bins


# -----------------------------------------------------------------------------
# the CPU recipe against the yardstick: training samples per second, side by side in one run


YARDSTICK_SIZE = 64  # pixels: the yardstick's default input size (docs/results.md)


def yardstick(channels: int) -> nn.Module:
    """The plain CNN box regressor every accuracy figure is held against (docs/results.md): five
    blocks of two conv3x3-BN-ReLU and a max-pool (32 to 256 channels), global average pooling, a
    linear layer to 4 sigmoid outputs. The modalities are its input channels."""
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                             nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                             nn.MaxPool2d(2))
    return nn.Sequential(block(channels, 32), block(32, 64), block(64, 128), block(128, 128),
                         block(128, 256), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 4),
                         nn.Sigmoid())


def yardstick_step(net, optimizer, x, y):
    """Its training step: a random left-right flip of the batch, L1 + (1 - GIoU), AdamW."""
    if torch.rand(()).item() < 0.5:
        x, y = x.flip(-1), torch.stack([1 - y[:, 2], y[:, 1], 1 - y[:, 0], y[:, 3]], 1)
    p = net(x)
    loss = F.l1_loss(p, y) + (1 - generalized_iou(p, y)).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def recipe_step(model, forward, ema, optimizer, params, images, boxes, augment, step, decay):
    """train.py's step of the CPU recipe, all of it: the batch's augmentation, its answer tokens,
    forward, backward, clip at 1.0, AdamW (train.train_step with one micro-batch, no autocast),
    then the weights' moving average (--ema). images (B, N, 3, S, S), boxes (B, 1, 4)
    normalised; forward: the model, compiled or not."""
    cfg = model.cfg
    images, boxes = augment(images, boxes, data.step_generator(0, step))
    answer, mask = data.answer_tokens(boxes, torch.ones(len(boxes), dtype=torch.long),
                                      cfg.num_bins, cfg.loc_start, cfg.box_end_id, cfg.eos_id,
                                      cfg.pad_id)
    loss = forward(images, answer, mask, boxes[:, 0])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        update_ema(ema, model, decay, step + 1)
    return loss.detach()


def bench_recipe(args, emit):
    """--recipe: samples/s of train.py's CPU recipe with each --modalities count, and of the
    yardstick on the same batch size and image size, one after the other in this process."""
    settings = Settings(**{**PRESETS["cpu"], "device": str(args.device), "compile": args.compile,
                           "bf16": False})
    B, S = settings.batch_size, settings.image_size
    device = args.device
    for n in args.modalities:
        g = torch.Generator().manual_seed(n)
        corners = torch.rand(B, 1, 2, 2, generator=g).sort(dim=2).values
        boxes = corners.transpose(2, 3).reshape(B, 1, 4).to(device)
        torch.manual_seed(0)
        base = 256
        parts = shape_parts(settings, base + N_SPECIALS)
        cfg = MiniGPTConfig(**parts, n_images=n, **prompt_ids(base, n, (4, 2, 8)),
                            loc_sigma=settings.loc_sigma, box_head=settings.box_head,
                            patch_loss=settings.patch_loss,
                            patch_cells=settings.patch_cells, flip_average=True)
        model = MiniGPT(cfg).to(device).train()
        params, optimizer = model.configure_optimizers(settings.lr, settings.weight_decay,
                                                             device)
        forward = torch.compile(model) if args.compile else model
        images = torch.randn(B, n, 3, S, S, generator=g).to(device)
        augment = data.Augment()
        ema = copy.deepcopy(model).requires_grad_(False) if settings.ema else None
        step = lambda k: recipe_step(model, forward, ema, optimizer, params, images, boxes,
                                     augment, k, settings.ema)
        ours = statistics.median(time_train(step, [], device, args.steps, args.warmup,
                                            counter=True))
        net = yardstick(n).to(device).train()
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
        # the yardstick at its own image size (cnn_baseline.py --size, default 64), as it runs
        # beside the recipe in every comparison
        x = torch.randn(B, n, YARDSTICK_SIZE, YARDSTICK_SIZE, generator=g).to(device)
        y = boxes[:, 0]
        cnn = statistics.median(time_train(lambda: yardstick_step(net, opt, x, y), [], device,
                                           args.steps, args.warmup))
        emit(kind="recipe", modalities=n, batch_size=B, image_size=S,
             yardstick_image_size=YARDSTICK_SIZE, compiled=args.compile,
             step_s=round(ours, 4), samples_per_s=round(B / ours, 1),
             yardstick_step_s=round(cnn, 4), yardstick_samples_per_s=round(B / cnn, 1),
             ratio=round(cnn / ours, 3), threads=torch.get_num_threads())


# -----------------------------------------------------------------------------


def bench_answers(args, models, cfg, emit):
    """Latency of one query for each model (ours compiled with --compile), and the peer's over
    ours with whether both answered the same boxes."""
    device = args.device
    image = random_batch(cfg, 1, "cpu", seed=1)[0]  # (1, N, 3, S, S) on the host
    answers = {}
    for name, m in models.items():
        for other in models.values():
            other.to(device if other is m else "cpu")
        m.eval()
        if args.bf16:  # answer in bf16 weights, as a served model is held
            m.to(torch.bfloat16)
        if name == "ours" and args.compile:
            m.compile_decode()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        times, box, bins = time_answer(m.generate, image, cfg, device, args.answers, warmup=3)
        answers[name] = (statistics.median(times), bins)
        emit(kind="answer", impl=name, compiled=name == "ours" and args.compile,
             latency_ms=round(1e3 * statistics.median(times), 3),
             min_ms=round(1e3 * min(times), 3), new_tokens=4 * cfg.max_boxes,
             box=[round(v, 1) for v in box],
             peak_memory_mb=round(peak_memory(device) / 2 ** 20, 1))
    if "peer" in answers:
        emit(kind="ratio", what="answer latency",
             peer_over_ours=round(answers["peer"][0] / answers["ours"][0], 3),
             same_boxes=torch.equal(answers["peer"][1],
                                    answers["ours"][1].view_as(answers["peer"][1])))


def bench_training(args, models, batch, B, seq, flops, peak, emit):
    """Median training-step time of each model (the peer eager and, with --compile, compiled), then
    ours on cached ViT features, then the peer's step time over ours."""
    device, model, peer = args.device, models["ours"], models.get("peer")
    peer_ok = peer is not None
    results = {}
    # back from answering: fp32 weights (bf16-rounded alike), the frozen ViT in bf16
    for m in models.values():
        m.float().train()
    if args.bf16:
        model.vit.to(torch.bfloat16)
        if peer_ok:
            peer.vision.to(torch.bfloat16)
    variants = [("ours", args.compile)] + ([("peer", False)]
                                           + ([("peer", True)] if args.compile else [])
                                           if peer_ok else [])
    for name, compiled in variants:
        # only the measured model on the device, for its memory peak
        for other in models.values():
            other.to(device if other is models[name] else "cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        step = make_train_step(models[name], device, args.bf16, compiled)
        t0 = time.perf_counter()
        times = time_train(step, batch, device, args.steps, args.warmup)
        t = statistics.median(times)
        results[(name, compiled)] = t
        emit(kind="train", impl=name, compiled=compiled, step_s=round(t, 5),
             samples_per_s=round(B / t, 2), tokens_per_s=round(B * seq / t, 1),
             flops_per_step=flops, mfu=round(flops / t / peak, 4),
             peak_memory_mb=round(peak_memory(device) / 2 ** 20, 1),
             warmup_and_steps_s=round(time.perf_counter() - t0, 2))
        del step
    # train.py --cache-features: the frozen ViT's output computed once per image; less work per
    # step, so reported apart (no MFU: the FLOPs above include the ViT)
    model.to(device)  # the peer's runs above parked it on the host
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        feats = model.vit_features(batch[0])
    step = make_train_step(model, device, args.bf16, args.compile)
    t = statistics.median(time_train(step, (None, batch[1], batch[2], feats), device,
                                     args.steps, args.warmup))
    emit(kind="train", impl="ours", compiled=args.compile, cached_vit_features=True,
         step_s=round(t, 5), samples_per_s=round(B / t, 2),
         peak_memory_mb=round(peak_memory(device) / 2 ** 20, 1))
    del step, feats
    ours = results[("ours", args.compile)]
    for compiled in ([False, True] if args.compile else [False]):
        if ("peer", compiled) in results:
            emit(kind="ratio", what="train step", peer_compiled=compiled,
                 ours_compiled=args.compile,
                 peer_over_ours=round(results[("peer", compiled)] / ours, 3))


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPE_NAMES, default="tiny",
                   help="model shape with random weights (default tiny)")
    p.add_argument("--peer", action="store_true",
                   help="also build the same model from transformers parts and measure it in this "
                        "run, with ratios")
    p.add_argument("--steps", type=int,
                   help="timed training steps (default: 10 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=int,
                   help="untimed steps first, compilation included (default: 2 on CPU, 5 on CUDA)")
    p.add_argument("--answers", type=int, help="timed answers (default: 20 on CPU, 50 on CUDA)")
    p.add_argument("--batch-size", type=int,
                   help="training samples per step (default: the shape's, 8 tiny, 32 large)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step and our decode step; with --peer the peer "
                        "is timed both eager and compiled (default: on CUDA)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for training, frozen ViT and answering weights in bf16 "
                        "(default: on CUDA)")
    p.add_argument("--train", action=argparse.BooleanOptionalAction, default=None,
                   help="time training steps (default: on, except minigpt4-7b, whose full fp32 "
                        "AdamW state alone is ~110 GB)")
    p.add_argument("--answer", action=argparse.BooleanOptionalAction, default=True,
                   help="time answering (default on)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--ckpt", help="instead of --shape: a trained run folder (train.py's --out), "
                                   "timed with its own weights and shape; no peer")
    p.add_argument("--recipe", action="store_true",
                   help="instead of --shape: train.py's CPU recipe (augmentation included) against "
                        "the yardstick CNN, samples/s of each and their ratio")
    p.add_argument("--modalities", type=int, nargs="+", default=[3, 4],
                   help="with --recipe: images per sample, one measurement each (default 3 4)")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = args.device.type == "cuda"
    args.steps = args.steps or (20 if cuda else 10)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.answers = args.answers or (50 if cuda else 20)
    args.compile = cuda if args.compile is None else args.compile
    args.bf16 = cuda if args.bf16 is None else args.bf16
    args.train = args.shape != "minigpt4-7b" if args.train is None else args.train
    return args


def main(argv=None, out=print) -> list[dict]:
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    records = []

    def emit(**r):
        records.append(r)
        out(json.dumps(r))

    if args.recipe:
        bench_recipe(args, emit)
        return records
    trained = None  # --ckpt: the run's model
    if args.ckpt:
        folder, trained, _ = load_checkpoint(args.ckpt)
        saved = config.read_saved(folder)  # None: a run from before settings.json
        cfg, B = trained.cfg, saved["settings"]["batch_size"] if saved else 32
        args.shape, args.peer = str(folder), False
    else:
        cfg, B = shape_config(args.shape)
    B = args.batch_size or B
    peer_ok = False
    if args.peer:
        try:
            import transformers  # noqa: F401
            peer_ok = True
        except ImportError:
            emit(kind="peer-skipped", reason="transformers is not installed "
                                             "(pip install transformers -c requirements.txt)")
    if args.shape in SHAPE_NAMES[1:] and device.type == "cpu":
        with torch.device("meta"):  # the shapes build; FLOPs need no weights
            model, peer = MiniGPT(cfg), Peer(cfg) if peer_ok else None
        model.freeze(vit=True)
        params = {"params_ours": sum(p.numel() for p in model.parameters())}
        if peer_ok:
            params["params_peer"] = sum(p.numel() for p in peer.parameters())
        emit(kind="skipped", shape=args.shape, device=str(device), **params,
             flops_per_step=B * model.flops_per_sample(),
             reason=f"{args.shape} is for a GPU; on CPU it is only built on the meta device")
        return records

    torch.manual_seed(0)
    with torch.device(device):  # the peer when there is one, ours holding its weights either way
        peer = Peer(cfg) if peer_ok else None
        model = (ours_from_peer(peer, device) if peer_ok else trained.to(device) if trained
                 else MiniGPT(cfg))
    models = {"ours": model} | ({"peer": peer} if peer_ok else {})
    for m in models.values():
        m.train()
    model.freeze(vit=True)
    if peer_ok:
        peer.vision.requires_grad_(False)
    if args.bf16:
        model.vit.to(torch.bfloat16)
        if peer_ok:
            peer.vision.to(torch.bfloat16)

    peak = peak_flops(device)
    seq = model.prompt_len + 4 * cfg.max_boxes + 1  # the LLM's sequence in training
    flops = B * model.flops_per_sample()
    emit(kind="peak", device=str(device), dtype="bfloat16" if device.type == "cuda" else "float32",
         tflops=round(peak / 1e12, 4), threads=torch.get_num_threads())
    emit(kind="shape", shape=args.shape, batch_size=B, images_per_sample=cfg.n_images,
         image_size=cfg.vit.image_size, seq_len=seq, flops_per_step=flops,
         **{f"params_{k}": sum(p.numel() for p in m.parameters()) for k, m in models.items()},
         trained_params=sum(p.numel() for p in model.parameters() if p.requires_grad))

    batch = random_batch(cfg, B, device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        losses = {k: m(*batch).item() for k, m in models.items()}
    emit(kind="loss", **losses)  # the same weights: the same loss (bf16 rounding apart)

    if args.answer:
        bench_answers(args, models, cfg, emit)
    if args.train:
        bench_training(args, models, batch, B, seq, flops, peak, emit)
    return records


if __name__ == "__main__":
    main()
