"""
Train minigpt-mri: several MRI modalities of one slice in, the tumour's box out, as location tokens.

    python train.py                                  # embedded default: demo data, small model, this device's recipe
    python train.py --data summary.jsonl --out out   # your data (a patient-level split of it validates)
    torchrun --nproc_per_node=4 train.py --data ...  # several GPUs (DistributedDataParallel)

Every knob is a flag (see --help); the ones left unset come from the recipe of the device the run is on
(CPU_RECIPE or GPU_RECIPE below). The whole configuration is saved in the checkpoint, so `--resume`
and sample.py rebuild exactly what was trained.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

import data
import prepare
from model import PRESENT_AT, SHAPES, MiniGPT, MiniGPTConfig, shape_parts
from vision import CheckpointError, ViTConfig

# Recipes: the defaults of every size and schedule knob, per kind of device. A flag given on the
# command line wins. The CPU recipe trains in minutes on 2 cores; the GPU recipe fills an H200-class GPU.
CPU_RECIPE = dict(
    **SHAPES["cpu"], num_bins=64, loc_sigma=1.0, box_head="regress", patch_loss=1.0,
    batch_size=32, lr=1e-3, warmup_steps=100, max_minutes=8.0, eval_every=200, compile=False, bf16=False,
)
GPU_RECIPE = dict(
    **SHAPES["gpu"], num_bins=128, loc_sigma=1.0, box_head="regress", patch_loss=1.0,
    batch_size=64, lr=5e-4, warmup_steps=200, max_minutes=8.0, eval_every=500, compile=True, bf16=True,
)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message} (see --help)")  # one line, not the whole usage
    g = p.add_argument_group("data")
    g.add_argument("--data", help="training summary.jsonl (default: make the demo dataset under OUT/demo and train on it)")
    g.add_argument("--val", help="validation summary.jsonl (default: a patient-level split of --data)")
    g.add_argument("--val-fraction", type=float, default=0.2, help="share of patients held out when --val is not given (default 0.2)")
    g.add_argument("--box-format", choices=["corners", "xywh"], default="corners",
                   help="how boxes are written in the jsonl: two opposite corners, e.g. [maxx, maxy, minx, miny] (default), or COCO [x, y, w, h]")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random flips, zoom, shifts, small rotations and intensity jitter that move the boxes with the pixels (default on)")
    g.add_argument("--augment-strength", type=float, default=1.0,
                   help="multiplies every augmentation range (zoom, shift, rotation, intensity, noise) of data.Augment (default 1)")
    g.add_argument("--cache-features", action="store_true",
                   help="with a frozen ViT (--freeze-vit, --minigpt4) and --no-augment: run the ViT once per image and "
                        "train on its stored output (less work per step; the same result)")
    g.add_argument("--max-boxes", type=int, default=1, help="boxes per answer; rows with more keep the largest (default 1)")
    g.add_argument("--out", default="out", help="output folder: checkpoint, metrics.jsonl, curves.png (default out/)")
    g = p.add_argument_group("model (unset sizes come from the device recipe)")
    g.add_argument("--vision", help="pretrained vision folder: a BLIP-2 (EVA ViT-g + Q-Former) or CLIP checkpoint in Hugging Face layout")
    g.add_argument("--llm", help="pretrained LLaMA-family folder (config.json, safetensors, tokenizer.model)")
    g.add_argument("--template", choices=sorted(data.TEMPLATES), default="plain",
                   help="conversation template wrapped around the prompt, for chat LLMs: vicuna (MiniGPT-4), llama2 (default plain)")
    g.add_argument("--minigpt4", action="store_true",
                   help="MiniGPT-4 shape: needs --vision BLIP2 and --llm VICUNA; sets template vicuna, 224 px, freezes ViT and Q-Former, LoRA r=8 on the LLM")
    g.add_argument("--fusion", choices=["per-image", "early"], default="per-image",
                   help="per-image: one Q-Former pass and one prompt slot per modality (default); "
                        "early: all modalities' ViT tokens in one Q-Former pass, one slot (the original blog's variant)")
    for name, help_ in [("image-size", "pixels the images are resized to"), ("patch-size", "ViT patch size"),
                        ("vit-width", "ViT width"), ("vit-depth", "ViT blocks"), ("vit-heads", "ViT heads"),
                        ("num-query", "Q-Former queries = tokens per image"), ("qformer-width", "Q-Former width"),
                        ("qformer-depth", "Q-Former layers"), ("qformer-heads", "Q-Former heads"),
                        ("cross-every", "Q-Former cross-attention every k-th layer"),
                        ("dim", "LLM width"), ("n-layers", "LLM layers"), ("n-heads", "LLM heads"),
                        ("n-kv-heads", "LLM key/value heads (grouped-query attention)"),
                        ("num-bins", "location bins per coordinate")]:
        g.add_argument(f"--{name}", type=int, help=f"{help_} (default: recipe)")
    g.add_argument("--vit-stem", choices=["patch", "cnn", "conv"],
                   help="from-scratch ViT patch embedding: patch (one strided conv), cnn (conv-BN-ReLU pairs and max-pooling: "
                        "a hybrid ViT), conv (one stride-2 conv per halving, Xiao et al. 2021) (default: recipe)")
    g.add_argument("--pooled-queries", action=argparse.BooleanOptionalAction, default=None,
                   help="from-scratch Q-Former: each query starts with its region of the image grid, average-pooled (default: recipe)")
    g.add_argument("--patch-loss", type=float,
                   help="weight of the auxiliary loss where each ViT patch predicts how much of it the box covers, 0 = off (default: recipe)")
    g.add_argument("--box-head", choices=["tokens", "regress"],
                   help="tokens: the box is read from the answered location tokens; regress: the original blog's "
                        "MLP on the hidden state at <box>, trained with L1 + GIoU beside the token loss, answers instead (default: recipe)")
    g.add_argument("--flip-average", action=argparse.BooleanOptionalAction, default=None,
                   help="answer with the mean of the box and the mirrored box of the mirrored study (default: on when --augment flips)")
    g.add_argument("--loc-sigma", type=float, help="label smoothing over neighbouring location bins, Gaussian std in bins (default: recipe)")
    g.add_argument("--grad-checkpoint", action="store_true",
                   help="activation checkpointing of the LLM's blocks: less memory, one more forward per step (large shapes)")
    g.add_argument("--freeze-vit", action="store_true", help="do not train the ViT")
    g.add_argument("--freeze-qformer", action="store_true", help="do not train the Q-Former (its output Linear still trains)")
    g.add_argument("--freeze-llm", action="store_true", help="do not train the LLM (LoRA adapters, if any, still train)")
    g.add_argument("--lora-rank", type=int, default=0, help="LoRA rank on the LLM's q and v projections (default 0: off)")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    g = p.add_argument_group("optimisation (unset values come from the device recipe)")
    g.add_argument("--batch-size", type=int, help="samples per step on each process (default: recipe)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches accumulated per step (default 1)")
    g.add_argument("--lr", type=float, help="peak learning rate (default: recipe)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate as a share of the peak (default 0.1)")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps (default: recipe)")
    g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay on matrices (default 0.05)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip, 0 = off (default 1.0)")
    g.add_argument("--max-steps", type=int, help="stop after this many steps (default: none, the time budget decides)")
    g.add_argument("--max-minutes", type=float, help="time budget: stop, evaluate and save when it runs out (default: recipe)")
    g.add_argument("--decay-steps", type=int,
                   help="steps of the cosine decay (default --max-steps; with only a time budget the decay follows the clock)")
    g.add_argument("--eval-every", type=int, help="evaluate and save every N steps (default: recipe)")
    g.add_argument("--log-every", type=int, default=25, help="progress line every N steps (default 25)")
    g.add_argument("--seed", type=int, default=0, help="seed for initialisation, data order and the split (default 0)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out; the model is rebuilt from that checkpoint's own settings")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that holds a checkpoint, replacing it at the first save (default: refuse)")
    g.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model (default: on CUDA)")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on CUDA)")
    for a in p._actions:  # --help shows the values a run will use
        if a.dest in CPU_RECIPE and a.help and "(default: recipe)" in a.help:
            a.help = a.help.replace("(default: recipe)", f"(default: {CPU_RECIPE[a.dest]} on CPU, {GPU_RECIPE[a.dest]} on GPU)")
    args = p.parse_args(argv)
    args.given = sorted(given_flags(p, sys.argv[1:] if argv is None else argv))  # saved with the run
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite contradict each other: --resume continues the checkpoint in --out, "
                "--overwrite replaces it")

    if args.minigpt4:
        if not (args.vision and args.llm):
            p.error("--minigpt4 needs --vision (a BLIP-2 folder) and --llm (a Vicuna/LLaMA folder)")
        args.template = "vicuna" if args.template == "plain" else args.template
        args.image_size = args.image_size or 224
        args.freeze_vit = args.freeze_qformer = True
        args.freeze_llm = True
        args.lora_rank = args.lora_rank or 8
    if args.cache_features and (not args.freeze_vit or args.augment):
        p.error("--cache-features needs a frozen ViT (--freeze-vit or --minigpt4) and --no-augment "
                "(augmented pixels change every step, so their features cannot be stored)")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    recipe = dict(GPU_RECIPE if args.device.startswith("cuda") else CPU_RECIPE)
    if args.max_steps:  # a step count given alone is not also cut by the recipe's clock
        recipe.pop("max_minutes")
    if args.vision:  # a pretrained ViT brings its own sizes and, unless --image-size says otherwise, its image size
        for k in ("image_size", "patch_size", "vit_width", "vit_depth", "vit_heads", "vit_stem"):
            recipe.pop(k)
        recipe.update(pooled_queries=False, patch_loss=0.0)  # the pretrained towers as they were trained
    for k, v in recipe.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def given_flags(parser, argv):
    """The dests of the options written on the command line (as opposed to defaults and recipe values)."""
    words = {w.split("=", 1)[0] for w in argv if w.startswith("--")}
    return {a.dest for a in parser._actions if any(o in words or "--no-" + o[2:] in words for o in a.option_strings)}


# What fixes the model and its data pipeline: on --resume these come from the checkpoint, and a flag that
# disagrees with it is an error (a resumed run cannot change the shapes it trained).
MODEL_FLAGS = ("image_size", "patch_size", "vit_width", "vit_depth", "vit_heads", "vit_stem", "num_query",
               "qformer_width", "qformer_depth", "qformer_heads", "cross_every", "pooled_queries", "dim", "n_layers",
               "n_heads", "n_kv_heads", "num_bins", "box_head", "loc_sigma", "patch_loss", "fusion", "template",
               "max_boxes", "lora_rank", "lora_alpha", "flip_average", "box_format", "vision", "llm", "minigpt4")


def resume_args(args, ckpt):
    """Take the model's settings from the checkpoint's config.json; a flag given on this command line
    that disagrees is a CheckpointError naming the flag and both values."""
    try:
        saved = json.loads((ckpt / "config.json").read_text())["meta"]["args"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt / 'config.json'}: cannot read the run's settings ({e})") from None
    for k in MODEL_FLAGS:
        if k not in saved:
            continue
        if k in args.given and getattr(args, k) != saved[k]:
            raise CheckpointError(f"--{k.replace('_', '-')} {getattr(args, k)} disagrees with the checkpoint in {ckpt} "
                                  f"({saved[k]}); drop the flag to resume, or train afresh with another --out")
        setattr(args, k, saved[k])


# -----------------------------------------------------------------------------
# Setting up a run: processes, the output folder, data, tokenizer, model, optimiser

def start_processes(args):
    """Under torchrun, one process per GPU (or CPU process on gloo), each with its share of the batch.
    -> (ddp, rank, world, device)."""
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = 0, 1
    if ddp:
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
    return ddp, rank, world, torch.device(args.device)


def open_out(args, out):
    """Check --out before any work: never replace a checkpoint by accident. With --resume, read the
    training state and take the model's settings from the checkpoint (resume_args). -> state or None."""
    if out.exists() and not out.is_dir():
        raise data.DataError(f"--out {out}: is a file; name a folder (it is created if missing)")
    has_ckpt = any((out / n / "model.safetensors").exists() for n in ("ckpt", "ckpt.old"))
    if has_ckpt and not (args.resume or args.overwrite):
        raise CheckpointError(f"--out {out} already holds a checkpoint; continue it with --resume, train into "
                              f"another --out, or replace it with --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        return None
    ckpt = out / "ckpt"
    if not ckpt.exists() and (out / "ckpt.old").exists():  # a crash between save_checkpoint's two renames
        (out / "ckpt.old").rename(ckpt)
    if not (ckpt / "train_state.pt").exists():
        raise CheckpointError(f"--resume: no checkpoint in {ckpt} (expected {ckpt / 'train_state.pt'})")
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        if not (ckpt / name).is_file():
            raise CheckpointError(f"{ckpt / name}: missing; the checkpoint cannot be resumed")
    try:
        state = torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for damaged files
        raise CheckpointError(f"{ckpt / 'train_state.pt'}: cannot be read ({e})") from None
    resume_args(args, ckpt)
    return state


def read_data(args, log):
    """-> (modalities, training rows, validation rows): --val, or a patient-level split of --data."""
    modalities, samples = data.read_summary(args.data, box_format=args.box_format)
    if args.val:
        val_mods, val_samples = data.read_summary(args.val, box_format=args.box_format)
        if val_mods != modalities:
            raise data.DataError(f"{args.val}: modalities {val_mods} differ from {args.data}'s {modalities}")
        train_samples = samples
    else:
        train_samples, val_samples = data.split_by_patient(samples, args.val_fraction, args.seed)
    # Rows with "box": [] (a slice without tumour) teach and test the answer "no tumour"; IoU needs rows with a box.
    for name, rows in (("training", train_samples), ("validation", val_samples)):
        if not any(s.boxes for s in rows):
            raise data.DataError(f"{args.val if name == 'validation' and args.val else args.data}: "
                                 f"no {name} rows with a box (every row says \"box\": [])")
        n_empty = sum(not s.boxes for s in rows)
        if n_empty:
            log(f"{name}: {n_empty} of {len(rows)} rows without a tumour (\"box\": []), answered \"no tumour\"")
    return modalities, train_samples, val_samples


def model_config(args, tokenizer, n_images) -> MiniGPTConfig:
    """The model the flags describe. With --vision / --llm, MiniGPT.build replaces the loaded parts'
    sizes by their checkpoints' (image_size None: the checkpoint's own)."""
    n_slots = 1 if args.fusion == "early" else n_images
    sizes = {k: getattr(args, k) for k in SHAPES["cpu"]}
    if args.vision:  # the ViT's sizes are the checkpoint's (unset here): stand-ins until MiniGPT.build reads them
        sizes.update({k: v for k, v in SHAPES["cpu"].items() if sizes[k] is None})
    parts = shape_parts(sizes, tokenizer.vocab_size)
    if args.vision:
        parts["vit"] = ViTConfig(image_size=args.image_size)
    return MiniGPTConfig(
        **parts,
        n_images=n_images, fusion=args.fusion, prompt_chunks=data.prompt_chunks(tokenizer, n_slots, args.template),
        num_bins=args.num_bins, loc_start=tokenizer.loc_start, box_end_id=tokenizer.box_end_id,
        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, max_boxes=args.max_boxes,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, loc_sigma=args.loc_sigma, box_head=args.box_head,
        patch_loss=args.patch_loss, flip_average=args.augment if args.flip_average is None else args.flip_average,
    )


def make_optimizer(model, args, device):
    """AdamW, fused on CUDA; no weight decay on vectors (norms, biases) and the learned queries. -> (params, optimizer)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return params, torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def lr_at(args, step, elapsed):
    """Linear warmup, then a cosine to min_lr_ratio of the peak. Progress is the larger of the steps done
    (of --decay-steps, default --max-steps) and the time used (of --max-minutes): a run that stops on the
    clock still ends its schedule."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = 0.0
    decay_steps = args.decay_steps or args.max_steps
    if decay_steps:
        progress = max(progress, (step - args.warmup_steps) / max(1, decay_steps - args.warmup_steps))
    if args.max_minutes:
        progress = max(progress, elapsed / (args.max_minutes * 60))
    progress = min(progress, 1.0)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def cached_vit_tokens(model, images, device, autocast, log, batch_size=64):
    """--cache-features: a frozen ViT on unchanging pixels gives each image a constant output; compute it
    once. images (M, N, 3, S, S) -> (M, N, T, W) on the CPU."""
    t0 = time.time()
    with autocast():
        tokens = torch.cat([model.vit_tokens(images[i: i + batch_size].to(device).float()).cpu()
                            for i in range(0, len(images), batch_size)])
    log(f"cached ViT features in {time.time() - t0:.1f}s: {tuple(tokens.shape)} {tokens.dtype}, "
        f"{tokens.numel() * tokens.element_size() / 2 ** 20:.0f} MiB")
    return tokens


# -----------------------------------------------------------------------------
# Evaluation: greedy box answers on the validation split, scored by IoU.

@torch.no_grad()
def predict(model, images, samples, device, autocast, batch_size=64):
    """-> one answer per sample: pixel [x0, y0, x1, y1] of that sample's own image size, or None for
    "no tumour" (the model's tumour probability below PRESENT_AT)."""
    model.eval()
    with autocast():
        answers = [model.answer_boxes(images[i: i + batch_size].to(device).float()) for i in range(0, len(samples), batch_size)]
    model.train()
    boxes, p = torch.cat([b.float().cpu() for b, _ in answers]), torch.cat([p.float().cpu() for _, p in answers])
    return [data.to_pixels(b, s.size) if q >= PRESENT_AT else None for b, q, s in zip(boxes, p, samples)]


def mean_box_preds(train_boxes, train_nbox, samples):
    """The baseline a model must beat: always answer the mean training box (scaled to each image)."""
    m = train_boxes[train_nbox > 0, 0].mean(0)
    return [data.to_pixels(m, s.size) for s in samples]


# -----------------------------------------------------------------------------
# Checkpoints: a folder written under a temporary name and swapped in, so a crash never leaves half of one.

def metrics_row(step, seconds, score, baseline):
    """One evaluation as a line of metrics.jsonl: the step, the minutes of training, the scores and the mean-box answer's."""
    return dict(step=step, minutes=round(seconds / 60, 3), **{k: round(v, 4) for k, v in score.items()},
                **{f"meanbox_{k}": round(v, 4) for k, v in baseline.items()})


def save_run(out, model, optimizer, tokenizer, step, meta, metrics):
    """The checkpoint, then metrics.jsonl and curves.png beside it."""
    save_checkpoint(out, model, optimizer, tokenizer, step, meta)
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    plot_curves(metrics, out / "curves.png")


def save_checkpoint(out, model, optimizer, tokenizer, step, meta):
    tmp, final, old = out / "ckpt.tmp", out / "ckpt", out / "ckpt.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, extra=meta)
    shutil.copyfile(tokenizer.model_path, tmp / "tokenizer.model")
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "meta": meta}, tmp / "train_state.pt")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def plot_curves(metrics, path):
    """Validation mean IoU against minutes (left) and steps (right), the mean-box answer as a dashed
    reference line, and the training loss against steps below; drawn with pillow (no plotting dependency)."""
    evals = [m for m in metrics if "miou" in m]
    losses = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    W, H = 960, 640
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    panels = [("validation mean IoU", "minutes", [(m.get("minutes", 0.0), m["miou"]) for m in evals], (0, 0)),
              ("validation mean IoU", "step", [(m["step"], m["miou"]) for m in evals], (1, 0)),
              ("training loss", "step", losses, (0, 1))]
    ref = evals[-1]["meanbox_miou"] if evals else None
    for title, xlabel, pts, (col, row) in panels:
        x0, y0 = 70 + col * W // 2, 30 + row * H // 2
        x1, y1 = x0 + W // 2 - 100, y0 + H // 2 - 80
        d.rectangle([x0, y0, x1, y1], outline="black")
        d.text((x0, y0 - 18), title, fill="black")
        d.text(((x0 + x1) // 2 - 20, y1 + 22), xlabel, fill="black")
        iou = "IoU" in title
        xmax = max([p[0] for p in pts] + [1e-9])
        vmin, vmax = (0.0, 1.0) if iou else (min([p[1] for p in pts] + [0.0]), max([p[1] for p in pts] + [1.0]))
        X = lambda v: x0 + (x1 - x0) * v / xmax
        Y = lambda v: y1 - (y1 - y0) * (v - vmin) / ((vmax - vmin) or 1)
        for k in range(5):  # tick values on both axes
            fx, fy = xmax * k / 4, vmin + (vmax - vmin) * k / 4
            d.line([X(fx), y1, X(fx), y1 + 4], fill="black")
            d.text((X(fx) - 10, y1 + 6), f"{fx:.3g}", fill="black")
            d.line([x0 - 4, Y(fy), x0, Y(fy)], fill="black")
            d.text((x0 - 40, Y(fy) - 6), f"{fy:.2f}", fill="black")
        if iou and ref is not None:
            for xa in range(int(x0), int(x1), 12):  # the mean-box answer, dashed
                d.line([xa, Y(ref), min(xa + 6, x1), Y(ref)], fill=(120, 120, 120))
            d.text((x1 - 120, Y(ref) - 14), f"mean box {ref:.3f}", fill=(120, 120, 120))
        xy = [(X(a), Y(b)) for a, b in pts]
        color = (200, 60, 30) if iou else (30, 90, 200)
        if len(xy) > 1:
            d.line(xy, fill=color, width=2)
        for x, y in xy if iou else xy[-1:]:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    img.save(path)


# -----------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    out = Path(args.out)
    ddp, rank, world, device = start_processes(args)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    resume_state = open_out(args, out)

    # ---- data: the demo when no file is given; the patient split; the tokenizer (trained on the prompt
    # text from scratch, the LLM's own with --llm, the checkpoint's when resuming)
    if args.data is None:
        if master:
            prepare.make_demo(out / "demo", seed=args.seed)
        if ddp:
            dist.barrier()
        args.data = str(out / "demo" / "summary.jsonl")
    modalities, train_samples, val_samples = read_data(args, log)
    if args.llm:
        tokenizer = data.Tokenizer(Path(args.llm) / "tokenizer.model", args.num_bins)
    elif resume_state:
        tokenizer = data.Tokenizer(out / "ckpt" / "tokenizer.model", args.num_bins)
    else:
        if master:
            data.Tokenizer.train(out / "tokenizer.model", num_bins=args.num_bins)
        if ddp:
            dist.barrier()
        tokenizer = data.Tokenizer(out / "tokenizer.model", args.num_bins)
    log(f"data: {len(train_samples)} train / {len(val_samples)} val slices, modalities {modalities}")

    # ---- model and optimiser; a resumed run continues from the checkpoint's weights and moments
    model = MiniGPT.build(model_config(args, tokenizer, len(modalities)), vision_folder=args.vision, llm_folder=args.llm)
    model.freeze(vit=args.freeze_vit, qformer=args.freeze_qformer, llm=args.freeze_llm)
    model.llm.grad_checkpoint = args.grad_checkpoint
    cfg = model.cfg  # loading pretrained parts fills in their sizes
    model.to(device)
    # what sample.py needs besides the weights to read images the way training did
    meta = dict(modalities=modalities, image_size=cfg.vit.image_size, mean=list(data.CLIP_MEAN), std=list(data.CLIP_STD),
                box_format=args.box_format, template=args.template, args=vars(args))
    params, optimizer = make_optimizer(model, args, device)
    step = 0
    if resume_state:
        model.load_state_dict(MiniGPT.from_checkpoint(out / "ckpt").state_dict())
        optimizer.load_state_dict(resume_state["optimizer"])
        step = resume_state["step"]
        log(f"resumed from {out / 'ckpt'} at step {step}")
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{sum(p.numel() for p in params) / 1e6:.2f}M trained, {cfg.n_slots} slot(s) x {cfg.qformer.num_query} "
        f"image tokens, device {device}")
    train_model = torch.compile(model) if args.compile else model
    if ddp:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    bf16 = args.bf16 and device.type == "cuda"
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    # ---- every image read once into memory; a batch is then an index into these tensors
    t0 = time.time()
    tr_images, tr_boxes, tr_nbox = data.load_tensors(train_samples, cfg.vit.image_size, cfg.max_boxes)
    va_images, _, _ = data.load_tensors(val_samples, cfg.vit.image_size, cfg.max_boxes)
    log(f"loaded images in {time.time() - t0:.1f}s: train {tuple(tr_images.shape)}")
    baseline = data.score_boxes(mean_box_preds(tr_boxes, tr_nbox, val_samples), val_samples)
    tr_tokens = cached_vit_tokens(model, tr_images, device, autocast, log) if args.cache_features else None

    # ---- bookkeeping: metrics so far (a resumed run keeps its curve), the clock, the last saved step
    metrics = []
    if resume_state and (out / "metrics.jsonl").exists():
        metrics = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if m["step"] <= step]
    elapsed0 = resume_state["meta"].get("elapsed", 0.0) if resume_state else 0.0
    t_start = time.time()
    clock = lambda: elapsed0 + time.time() - t_start  # seconds of training, across resumes
    last_good = step if resume_state else None
    evaluated_at = None

    def evaluate_and_save(step):  # process 0 scores and saves; the others wait for it
        if master:
            t = time.time()
            s = data.score_boxes(predict(model, va_images, val_samples, device, autocast), val_samples)
            metrics.append(metrics_row(step, clock(), s, baseline))
            log(f"eval step {step}: val {data.score_line(s)} (mean-box answer: {data.score_line(baseline)}) "
                f"[{time.time() - t:.1f}s]")
            meta["elapsed"] = clock()
            save_run(out, model, optimizer, tokenizer, step, meta, metrics)
        if ddp:
            dist.barrier()
        return step

    def stop_on_nan(loss_val, lr):
        where = (f"the last good checkpoint (step {last_good}) is kept in {out / 'ckpt'}" if last_good is not None
                 else "no checkpoint was written")
        sys.exit(f"training stopped: the loss became {loss_val} near step {step} (lr {lr:.3g}); {where}. "
                 f"Lower --lr or check the data.")

    # ---- the loop: until --max-steps or the clock runs out
    augment = data.Augment().scaled(args.augment_strength) if args.augment else None
    model.train()
    micro = args.batch_size // args.grad_accum
    assert micro * args.grad_accum == args.batch_size, "--batch-size must be a multiple of --grad-accum"
    t_log, loss_acc, n_acc = time.time(), 0.0, 0
    budget = args.max_minutes * 60 if args.max_minutes else None
    while not ((args.max_steps and step >= args.max_steps) or (budget and clock() >= budget)):
        lr = lr_at(args, step, clock())
        for g in optimizer.param_groups:
            g["lr"] = lr

        # this process's share of the step's samples and their augmentation: fixed functions of
        # (seed, step, rank), so a resumed run sees the same batches
        idx = data.batch_indices(step, args.batch_size, len(train_samples), args.seed, rank, world)
        if tr_tokens is None:
            images, tokens = tr_images[idx].to(device, non_blocking=True).float(), None
        else:
            images, tokens = None, tr_tokens[idx].to(device, non_blocking=True)
        boxes = tr_boxes[idx].to(device)
        if augment:
            images, boxes = augment(images, boxes, data.step_generator(args.seed, step, rank, world))
        answer, mask = data.answer_tokens(boxes, tr_nbox[idx].to(device), cfg.num_bins, cfg.loc_start,
                                          cfg.box_end_id, cfg.eos_id, cfg.pad_id)

        # forward and backward in micro-batches; DDP averages gradients only on the last one
        for k in range(args.grad_accum):
            sl = slice(k * micro, (k + 1) * micro)
            if ddp:
                train_model.require_backward_grad_sync = k == args.grad_accum - 1
            with autocast():
                loss = train_model(None if images is None else images[sl], answer[sl], mask[sl], boxes[sl, 0],
                                   None if tokens is None else tokens[sl]) / args.grad_accum
            loss.backward()
            loss_acc += loss.detach()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        n_acc += 1

        # the loss is read back (a host sync) only here, and always before a checkpoint is written
        if step % args.log_every == 0 or step % args.eval_every == 0 or step == args.max_steps:
            loss_val = (loss_acc / n_acc).item()
            if not math.isfinite(loss_val):
                stop_on_nan(loss_val, lr)
            dt = time.time() - t_log
            left = [budget - clock()] if budget else []
            if args.max_steps:
                left.append((args.max_steps - step) * dt / n_acc)
            log(f"step {step}: loss {loss_val:.4f}, lr {lr:.2e}, {n_acc * args.batch_size * world / dt:.1f} samples/s, "
                f"{min(left, default=float('nan')) / 60:.1f} min left")
            metrics.append(dict(step=step, loss=round(loss_val, 5), lr=lr))
            t_log, loss_acc, n_acc = time.time(), 0.0, 0
        if step % args.eval_every == 0:
            last_good = evaluated_at = evaluate_and_save(step)

    if n_acc and not math.isfinite(loss_val := (loss_acc / n_acc).item()):
        stop_on_nan(loss_val, lr)
    if evaluated_at != step:
        evaluate_and_save(step)
    log(f"done: {step} steps in {clock() / 60:.1f} min; checkpoint in {out / 'ckpt'}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (data.DataError, CheckpointError) as e:  # the user's input: one line, no traceback
        sys.exit(f"error: {e}")
