"""
Train minigpt-mri: several MRI modalities of one slice in, the tumour's box out, as location tokens.

    python train.py                                  # embedded default: demo data, small model
    python train.py --data summary.jsonl --out out   # your data (a patient-level split validates)
    torchrun --nproc_per_node=4 train.py --data ...  # several GPUs (DistributedDataParallel)

Every setting is a flag (see --help); the ones left unset come from a preset in config.py (cpu or
gpu by the device the run is on, or --preset NAME). The settings are saved with the checkpoint, so
`--resume` and sample.py rebuild exactly what was trained.
"""

import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

import config
import data
import prepare
from config import CheckpointError, DataError, SettingError
from model import PRESENT_AT, MiniGPT, MiniGPTConfig, shape_parts, update_ema
from vision import ViTConfig


# -----------------------------------------------------------------------------
# Setting up a run: processes, the output folder, data, tokenizer, model, optimiser

def start_processes(s):
    """Under torchrun, one process per GPU (or CPU process on gloo), each with its share of the
    batch. -> (ddp, rank, world, device)."""
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = 0, 1
    if ddp:
        dist.init_process_group("nccl" if s.device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if s.device.startswith("cuda"):
            s.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(s.device)
    return ddp, rank, world, torch.device(s.device)


def open_out(s, given):
    """Check --out before any work: never replace a checkpoint by accident. With --resume, the run
    continues with the checkpoint's settings and the flags given now. -> (settings, training state
    {"step", "optimizer", "elapsed"} or None)."""
    out = Path(s.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file; name a folder (it is created if missing)")
    has_ckpt = any((out / n / "model.safetensors").exists() for n in CKPT_NAMES)
    if has_ckpt and not (s.resume or s.overwrite):
        raise CheckpointError(f"--out {out} already holds a checkpoint; continue it with --resume, "
                              f"train into another --out, or replace it with --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    if not s.resume:
        return s, None
    ckpt = out / "ckpt"
    if not ckpt.exists() and (out / "ckpt.old").exists():  # a crash between save's two renames
        (out / "ckpt.old").rename(ckpt)
    if not (ckpt / "model.safetensors").exists():
        raise CheckpointError(f"--resume: no checkpoint in {ckpt} "
                              f"(expected {ckpt / 'model.safetensors'})")
    for name in ("config.json", "model.safetensors", "tokenizer.model", "settings.json"):
        if not (ckpt / name).is_file():
            raise CheckpointError(f"{ckpt / name}: missing; the checkpoint cannot be resumed")
    state = load_train_state(ckpt)
    saved = config.read_saved(ckpt)
    settings = config.resumed(saved["settings"], given, ckpt)
    return settings, dict(state, elapsed=saved.get("elapsed", 0.0))


# The checkpoint folder, OUT/ckpt, written whole by save_checkpoint:
#   model.safetensors, config.json   the weights and the model's config, with under "meta" what an
#                                    answer needs besides them (MiniGPT.save_pretrained)
#   settings.json                    the run's settings and its clock (config.write_saved)
#   tokenizer.model                  the sentencepiece model, location tokens included
#   val.jsonl                        the validation rows the run scored (image paths absolute)
#   train_state.pt                   the optimiser's moments and the step, for --resume (with
#                                    --ema also the trained weights: model.safetensors holds
#                                    their average)
CKPT_NAMES = ("ckpt", "ckpt.old")  # the checkpoint, and the one being replaced during a save


def save_checkpoint(out, model, tokenizer, meta, s, val_samples, optimizer, step, elapsed,
                    trained=None):
    """Write OUT/ckpt whole: under ckpt.tmp first, then renamed over the old one, so a crash never
    leaves half of one (open_out takes ckpt.old back after a crash between the renames). model:
    what answers (with --ema the average); trained: the weights the optimiser steps, when they
    are another model, kept in train_state.pt for --resume."""
    out = Path(out)
    tmp, final, old = out / "ckpt.tmp", out / "ckpt", out / "ckpt.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, extra=meta)
    shutil.copyfile(tokenizer.model_path, tmp / "tokenizer.model")
    config.write_saved(tmp, s, elapsed)
    (tmp / "val.jsonl").write_text("".join(json.dumps(row) + "\n" for row in
                                           val_rows(val_samples, meta["modalities"])))
    state = {"step": step, "optimizer": optimizer.state_dict()}
    if trained is not None:
        state["trained"] = trained.state_dict()
    torch.save(state, tmp / "train_state.pt")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def val_rows(samples, modalities):
    """The validation rows as summary.jsonl rows that read from anywhere: image paths absolute, the
    patient under "case"."""
    keys = [f"{m}_path" for m in modalities]
    return [{**s.row, **dict(zip(keys, s.paths)), "case": s.case} for s in samples]


def load_train_state(folder) -> dict:
    """--resume: the optimiser state and step of a checkpoint folder."""
    try:
        return torch.load(folder / "train_state.pt", map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{folder / 'train_state.pt'}: missing; the checkpoint cannot be "
                              f"resumed") from None
    except Exception as e:  # torch raises several types for damaged files
        raise CheckpointError(f"{folder / 'train_state.pt'}: cannot be read ({e})") from None


def read_data(s, log):
    """-> (modalities, context slices, training rows, validation rows): --val, or a patient-level
    split of --data. Context slices: the rows' data.context_slices, how their pictures were
    made."""
    modalities, samples = data.read_summary(s.data, box_format=s.box_format)
    context = data.context_slices(samples, s.data)
    if s.val:
        val_mods, val_samples = data.read_summary(s.val, box_format=s.box_format)
        if val_mods != modalities:
            raise DataError(f"{s.val}: modalities {val_mods} differ from {s.data}'s {modalities}")
        val_context = data.context_slices(val_samples, s.val)
        if val_context != context:
            raise DataError(f"{s.val}: \"{data.CONTEXT_KEY}\" {val_context} differs from "
                            f"{s.data}'s {context}")
        train_samples = samples
    else:
        train_samples, val_samples = data.split_by_patient(samples, s.val_fraction, s.seed)
    # Rows with "box": [] (a slice without tumour) teach and test the answer "no tumour"; IoU needs
    # rows with a box.
    for name, rows in (("training", train_samples), ("validation", val_samples)):
        if not any(r.boxes for r in rows):
            raise DataError(f"{s.val if name == 'validation' and s.val else s.data}: "
                            f"no {name} rows with a box (every row says \"box\": [])")
        n_empty = sum(not r.boxes for r in rows)
        if n_empty:
            log(f"{name}: {n_empty} of {len(rows)} rows without a tumour (\"box\": []), "
                f"answered \"no tumour\"")
    return modalities, context, train_samples, val_samples


def make_tokenizer(s, resuming, master, ddp):
    """The LLM's own tokenizer with --llm, the checkpoint's when resuming, else one trained on the
    prompt text from scratch (by process 0; the others wait)."""
    out = Path(s.out)
    if s.llm:
        return data.Tokenizer(Path(s.llm) / "tokenizer.model", s.num_bins)
    if resuming:
        return data.Tokenizer(out / "ckpt" / "tokenizer.model", s.num_bins)
    if master:
        data.Tokenizer.train(out / "tokenizer.model", num_bins=s.num_bins)
    if ddp:
        dist.barrier()
    return data.Tokenizer(out / "tokenizer.model", s.num_bins)


def model_config(s, tokenizer, n_images) -> MiniGPTConfig:
    """The model the settings describe. With --vision / --llm, MiniGPT.build replaces the loaded
    parts' sizes by their checkpoints' (image_size None: the checkpoint's own)."""
    n_slots = 1 if s.fusion == "early" else n_images
    # a pretrained folder's sizes are unset here: the cpu preset's stand in until build reads them
    sizes = replace(s, **{k: v for k, v in config.PRESETS["cpu"].items() if getattr(s, k) is None})
    parts = shape_parts(sizes, tokenizer.vocab_size)
    if s.vision:
        parts["vit"] = ViTConfig(image_size=s.image_size)
    return MiniGPTConfig(
        **parts, n_images=n_images, fusion=s.fusion,
        prompt_chunks=data.prompt_chunks(tokenizer, n_slots, s.template),
        num_bins=s.num_bins, loc_start=tokenizer.loc_start, box_end_id=tokenizer.box_end_id,
        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, max_boxes=s.max_boxes,
        lora_rank=s.lora_rank, lora_alpha=s.lora_alpha, loc_sigma=s.loc_sigma, box_head=s.box_head,
        patch_loss=s.patch_loss, patch_cells=s.patch_cells, flip_average=s.flip_average,
    )


def lr_at(s, step, elapsed):
    """Linear warmup, then a cosine to min_lr_ratio of the peak. Progress is the larger of the steps
    done (of --decay-steps, default --max-steps) and the time used (of --max-minutes): a run that
    stops on the clock still ends its schedule."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = 0.0
    decay_steps = s.decay_steps or s.max_steps
    if decay_steps:
        progress = max(progress, (step - s.warmup_steps) / max(1, decay_steps - s.warmup_steps))
    if s.max_minutes:
        progress = max(progress, elapsed / (s.max_minutes * 60))
    progress = min(progress, 1.0)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast(device, bf16):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


@torch.no_grad()
def cached_vit_features(model, images, device, bf16, log, batch_size=64):
    """--cache-features: a frozen ViT on unchanging pixels gives each image a constant output;
    compute it once. images (M, N, 3, S, S) -> (M, N, T, W) on the CPU."""
    t0 = time.time()
    with autocast(device, bf16):
        feats = torch.cat([model.vit_features(images[i: i + batch_size].to(device).float()).cpu()
                           for i in range(0, len(images), batch_size)])
    log(f"cached ViT features in {time.time() - t0:.1f}s: {tuple(feats.shape)} {feats.dtype}, "
        f"{feats.numel() * feats.element_size() / 2 ** 20:.0f} MiB")
    return feats


# -----------------------------------------------------------------------------
# A training step, evaluation and the saved run

def train_step(train_model, optimizer, params, batch, s, ddp):
    """Forward and backward in --grad-accum micro-batches (DDP averages gradients only on the last),
    clip, step. batch: (images or None, answer, mask, boxes, feats or None). -> the loss, on device
    (read back only when logged: a host sync)."""
    images, answer, mask, boxes, feats = batch
    micro, total = s.batch_size // s.grad_accum, 0.0
    device = answer.device
    for k in range(s.grad_accum):
        sl = slice(k * micro, (k + 1) * micro)
        if ddp:
            train_model.require_backward_grad_sync = k == s.grad_accum - 1
        with autocast(device, s.bf16 and device.type == "cuda"):
            loss = train_model(None if images is None else images[sl], answer[sl], mask[sl],
                               boxes[sl, 0], None if feats is None else feats[sl]) / s.grad_accum
        loss.backward()
        total = total + loss.detach()
    if s.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


@torch.no_grad()
def predict(model, images, windows, device, bf16, batch_size=64):
    """-> one answer per sample: pixel [x0, y0, x1, y1] in that sample's own image (its window:
    data.load_images), or None for "no tumour" (the model's tumour probability below
    PRESENT_AT)."""
    model.eval()
    with autocast(device, bf16):
        answers = [model.answer_boxes(images[i: i + batch_size].to(device).float())
                   for i in range(0, len(windows), batch_size)]
    model.train()
    boxes = torch.cat([b.float().cpu() for b, _ in answers])
    p = torch.cat([p.float().cpu() for _, p in answers])
    return [data.to_pixels(b, w) if q >= PRESENT_AT else None
            for b, q, w in zip(boxes, p, windows)]


@torch.no_grad()
def second_look(model, samples, preds, image_size, device, bf16, batch_size=64):
    """--second-look: each answered box (pixels; None: "no tumour", left so) answered again
    through a window zoomed around it (data.load_zoomed) -> the new pixel boxes. sample.py's
    answer_samples does the same for sample.py."""
    looked = [i for i, b in enumerate(preds) if b is not None]
    out = list(preds)
    model.eval()
    for j in range(0, len(looked), batch_size):
        chunk = looked[j: j + batch_size]
        read = [data.load_zoomed(samples[i], preds[i], image_size) for i in chunk]
        with autocast(device, bf16):
            boxes, _ = model.answer_boxes(torch.stack([x for x, _ in read]).to(device).float())
        for i, b, (_, window) in zip(chunk, boxes.float().cpu(), read):
            out[i] = data.to_pixels(b, window)
    model.train()
    return out


def mean_box_preds(train_boxes, train_nbox, windows):
    """The baseline a model must beat: always answer the mean training box (scaled to each
    image's window)."""
    m = train_boxes[train_nbox > 0, 0].mean(0)
    return [data.to_pixels(m, w) for w in windows]


def metrics_row(step, seconds, score, baseline):
    """One evaluation as a line of metrics.jsonl: the step, the minutes of training, the scores and
    the mean-box answer's."""
    return dict(step=step, minutes=round(seconds / 60, 3),
                **{k: round(v, 4) for k, v in score.items()},
                **{f"meanbox_{k}": round(v, 4) for k, v in baseline.items()})


def stop_on_nan(loss_val, lr, step, last_good, out):
    where = (f"the last good checkpoint (step {last_good}) is kept in {out / 'ckpt'}"
             if last_good is not None else "no checkpoint was written")
    sys.exit(f"training stopped: the loss became {loss_val} near step {step} (lr {lr:.3g}); "
             f"{where}. Lower --lr or check the data.")


def plot_curves(metrics, path):
    """Validation mean IoU against minutes (left) and steps (right), the mean-box answer as a dashed
    reference line, and the training loss against steps below; drawn with pillow (no plotting
    dependency)."""
    evals = [m for m in metrics if "miou" in m]
    losses = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    W, H = 960, 640
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    panels = [("validation mean IoU", "minutes",
               [(m.get("minutes", 0.0), m["miou"]) for m in evals], (0, 0)),
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
        vmin, vmax = (0.0, 1.0) if iou else (min([p[1] for p in pts] + [0.0]),
                                             max([p[1] for p in pts] + [1.0]))
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
# The run: everything set up once, then the loop

@dataclass
class Job:
    """What the loop needs, set up by main: settings, processes, model and optimiser, the data as
    tensors (every image read once; a batch is an index into them)."""
    s: config.Settings
    device: torch.device
    ddp: bool
    rank: int
    world: int
    model: MiniGPT
    train_model: torch.nn.Module  # the model, compiled and/or wrapped in DDP
    params: list
    optimizer: torch.optim.Optimizer
    tokenizer: data.Tokenizer
    meta: dict  # what sample.py needs besides the weights to read images the way training did
    val_samples: list
    tr_images: torch.Tensor  # (M, N, 3, S, S)
    tr_boxes: torch.Tensor  # (M, max_boxes, 4) normalised
    tr_nbox: torch.Tensor  # (M,)
    tr_feats: torch.Tensor | None  # (M, N, T, W) with --cache-features
    va_images: torch.Tensor
    va_windows: list  # each validation row's window [x0, y0, w, h] (data.load_images)
    baseline: dict  # the mean-box answer's scores on the validation rows
    ema: MiniGPT | None  # --ema: the average of the weights, which is evaluated and saved


def next_batch(job, step, augment):
    """This process's share of the step's samples and their augmentation: fixed functions of (seed,
    step, rank), so a resumed run sees the same batches. -> (images, answer, mask, boxes, feats)."""
    s, device, cfg = job.s, job.device, job.model.cfg
    idx = data.batch_indices(step, s.batch_size, len(job.tr_images), s.seed, job.rank, job.world)
    images = feats = None
    if job.tr_feats is None:
        images = job.tr_images[idx].to(device, non_blocking=True).float()
    else:
        feats = job.tr_feats[idx].to(device, non_blocking=True)
    boxes = job.tr_boxes[idx].to(device)
    if augment:
        images, boxes = augment(images, boxes,
                                data.step_generator(s.seed, step, job.rank, job.world))
    answer, mask = data.answer_tokens(boxes, job.tr_nbox[idx].to(device), cfg.num_bins,
                                      cfg.loc_start, cfg.box_end_id, cfg.eos_id, cfg.pad_id)
    return images, answer, mask, boxes, feats


def evaluate_and_save(job, step, elapsed, metrics, log):
    """Process 0 scores the validation rows and saves the run (checkpoint, metrics.jsonl,
    curves.png); the others wait for it."""
    if job.rank == 0:
        t = time.time()
        bf16 = job.s.bf16 and job.device.type == "cuda"
        answering = job.ema if job.ema is not None else job.model
        preds = predict(answering, job.va_images, job.va_windows, job.device, bf16)
        first = ""
        if job.s.second_look:
            first = f"; first look: mean IoU {data.score_boxes(preds, job.val_samples)['miou']:.3f}"
            preds = second_look(answering, job.val_samples, preds, job.meta["image_size"],
                                job.device, bf16)
        score = data.score_boxes(preds, job.val_samples)
        metrics.append(metrics_row(step, elapsed, score, job.baseline))
        log(f"eval step {step}: val {data.score_line(score)} (mean-box answer: "
            f"{data.score_line(job.baseline)}{first}) [{time.time() - t:.1f}s]")
        out = Path(job.s.out)
        save_checkpoint(out, answering, job.tokenizer, job.meta, job.s, job.val_samples,
                        job.optimizer, step, elapsed, job.model if job.ema is not None else None)
        (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        plot_curves(metrics, out / "curves.png")
    if job.ddp:
        dist.barrier()


def train(job, step, elapsed0, metrics, log):
    """The loop: until --max-steps or the clock (--max-minutes, counted across resumes) runs out;
    evaluate and save every --eval-every steps and at the end."""
    s, out = job.s, Path(job.s.out)
    augment = data.Augment().scaled(s.augment_strength) if s.augment else None
    budget = s.max_minutes * 60 if s.max_minutes else None
    t_start = t_log = time.time()
    last_good = step if step else None  # the step of the checkpoint a NaN falls back to
    evaluated_at, loss_acc, n_acc, lr = None, 0.0, 0, s.lr
    while True:
        elapsed = elapsed0 + time.time() - t_start
        if (s.max_steps and step >= s.max_steps) or (budget and elapsed >= budget):
            break
        lr = lr_at(s, step, elapsed)
        for g in job.optimizer.param_groups:
            g["lr"] = lr
        batch = next_batch(job, step, augment)
        loss_acc = loss_acc + train_step(job.train_model, job.optimizer, job.params, batch, s,
                                         job.ddp)
        step, n_acc = step + 1, n_acc + 1
        if job.ema is not None:
            update_ema(job.ema, job.model, s.ema, step)
        if step % s.log_every == 0 or step % s.eval_every == 0 or step == s.max_steps:
            loss_val = (loss_acc / n_acc).item()  # the loss is read back (a host sync) only here
            if not math.isfinite(loss_val):
                stop_on_nan(loss_val, lr, step, last_good, out)
            dt = time.time() - t_log
            left = [budget - (elapsed0 + time.time() - t_start)] if budget else []
            if s.max_steps:
                left.append((s.max_steps - step) * dt / n_acc)
            log(f"step {step}: loss {loss_val:.4f}, lr {lr:.2e}, "
                f"{n_acc * s.batch_size * job.world / dt:.1f} samples/s, "
                f"{min(left, default=float('nan')) / 60:.1f} min left")
            metrics.append(dict(step=step, loss=round(loss_val, 5), lr=lr))
            t_log, loss_acc, n_acc = time.time(), 0.0, 0
        if step % s.eval_every == 0:
            evaluate_and_save(job, step, elapsed0 + time.time() - t_start, metrics, log)
            last_good = evaluated_at = step
    if n_acc and not math.isfinite(loss_val := (loss_acc / n_acc).item()):
        stop_on_nan(loss_val, lr, step, last_good, out)
    if evaluated_at != step:
        evaluate_and_save(job, step, elapsed0 + time.time() - t_start, metrics, log)
    return step, elapsed0 + time.time() - t_start


def main(argv=None):
    s, given = config.parse(argv, __doc__, cuda=torch.cuda.is_available())
    ddp, rank, world, device = start_processes(s)
    log = print if rank == 0 else (lambda *a, **k: None)
    s, state = open_out(s, given)  # --resume: the checkpoint's settings and training state
    out = Path(s.out)
    torch.manual_seed(s.seed)

    # data: the demo when no file is given; the patient split; the tokenizer
    if s.data is None:
        if rank == 0:
            prepare.make_demo(out / "demo", seed=s.seed)
        if ddp:
            dist.barrier()
        s.data = str(out / "demo" / "summary.jsonl")
    modalities, context, train_samples, val_samples = read_data(s, log)
    tokenizer = make_tokenizer(s, state is not None, rank == 0, ddp)
    log(f"data: {len(train_samples)} train / {len(val_samples)} val slices, "
        f"modalities {modalities}")

    # model and optimiser; a resumed run continues from the checkpoint's weights and moments
    model = MiniGPT.build(model_config(s, tokenizer, len(modalities)), vision_folder=s.vision,
                          llm_folder=s.llm)
    model.freeze(vit=s.freeze_vit, qformer=s.freeze_qformer, llm=s.freeze_llm)
    model.llm.grad_checkpoint = s.grad_checkpoint
    cfg = model.cfg  # loading pretrained parts fills in their sizes
    model.to(device)
    params, optimizer = model.configure_optimizers(s.lr, s.weight_decay, device)
    ema = None
    if s.ema:  # the average starts as the model (as the checkpoint's average when resuming)
        ema = copy.deepcopy(model).eval().requires_grad_(False)
    if state:
        saved = MiniGPT.from_checkpoint(out / "ckpt").state_dict()  # a run with --ema: the average
        model.load_state_dict(state.get("trained", saved))
        if ema is not None:
            ema.load_state_dict(saved)
        optimizer.load_state_dict(state["optimizer"])
        log(f"resumed from {out / 'ckpt'} at step {state['step']}")
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{sum(p.numel() for p in params) / 1e6:.2f}M trained, {cfg.n_slots} slot(s) x "
        f"{cfg.qformer.num_query} image tokens, device {device}")
    train_model = torch.compile(model) if s.compile else model
    if ddp:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)

    # every image read once into memory
    t0 = time.time()
    tr_images, tr_boxes, tr_nbox, _ = data.load_tensors(train_samples, cfg.vit.image_size,
                                                        cfg.max_boxes, crop=s.crop)
    va_images, _, _, va_windows = data.load_tensors(val_samples, cfg.vit.image_size,
                                                    cfg.max_boxes, crop=s.crop)
    zoomed = (data.zoom_tensors(train_samples, cfg.vit.image_size, cfg.max_boxes, s.seed)
              if s.second_look else None)
    baseline_rows = tr_boxes, tr_nbox  # the mean-box answer: of the whole views only
    if zoomed:  # the second look's views: more rows, drawn into batches as the whole views are
        tr_images, tr_boxes, tr_nbox = (torch.cat([a, b]) for a, b in
                                        zip((tr_images, tr_boxes, tr_nbox), zoomed))
    log(f"loaded images in {time.time() - t0:.1f}s: train {tuple(tr_images.shape)}")
    bf16 = s.bf16 and device.type == "cuda"
    tr_feats = (cached_vit_features(model, tr_images, device, bf16, log) if s.cache_features
                else None)
    meta = dict(modalities=modalities, image_size=cfg.vit.image_size, mean=list(data.CLIP_MEAN),
                std=list(data.CLIP_STD), crop=s.crop, box_format=s.box_format, template=s.template,
                second_look=s.second_look, **{data.CONTEXT_KEY: context})
    baseline = data.score_boxes(mean_box_preds(*baseline_rows, va_windows), val_samples)
    job = Job(s, device, ddp, rank, world, model, train_model, params, optimizer, tokenizer, meta,
              val_samples, tr_images, tr_boxes, tr_nbox, tr_feats, va_images, va_windows, baseline,
              ema)

    # a resumed run keeps its curve and its clock
    step = state["step"] if state else 0
    metrics = []
    if state and (out / "metrics.jsonl").exists():
        metrics = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                   if m["step"] <= step]
    step, elapsed = train(job, step, state["elapsed"] if state else 0.0, metrics, log)
    log(f"done: {step} steps in {elapsed / 60:.1f} min; checkpoint in {out / 'ckpt'}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (DataError, CheckpointError, SettingError) as e:  # the user's input: one line
        sys.exit(f"error: {e}")
