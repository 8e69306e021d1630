"""
What defines a run, in one place: its settings (model shape, data, optimisation) as typed fields
with their help and valid range, the named presets that fill them, the command-line flags made from
them, a run folder's settings.json (read_saved / write_saved), and the project's errors.

    settings = config.parse(argv)   # flags -> Settings: the preset, then the flags given; validated
    config.PRESETS["cpu"]           # the sizes and schedule of the CPU recipe

Adding a knob is one field: train.py's flag, its help, its check, --resume and the saved run follow.
"""

import argparse
import json
import math
import types
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


# -----------------------------------------------------------------------------
# The project's errors: the user's input. Each stops a command with one line, no traceback.

class DataError(ValueError):
    """A problem with the user's data; the message starts with "FILE:LINE: " when a line applies."""


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, of another architecture, or does not match the model."""


class SettingError(ValueError):
    """A setting out of its range; the message names the flag."""


# -----------------------------------------------------------------------------
# Settings: one field per knob. The metadata carries the flag's help, its valid range or choices;
# the field's default is the value no preset changes (None: "set by the preset or a pretrained
# folder").


def knob(default, help, range=None, choices=None):
    """A setting: its default, help text and valid values (range: inclusive (low, high),
    None = open)."""
    return field(default=default, metadata=dict(help=help, range=range, choices=choices))


TEMPLATES = ("plain", "vicuna", "llama2")  # data.TEMPLATES' names (a test checks they agree)
CROPS = ("none", "head")  # data.CROPS (a test checks they agree)
BIG = 1 << 30  # "no upper limit" for counts


@dataclass
class Shape:
    """What fixes the model and how its data is read. On --resume these come from the checkpoint,
    and a flag that disagrees with it is an error."""
    vision: str | None = knob(None, "pretrained vision folder: a BLIP-2 (EVA ViT-g + Q-Former) or "
                              "CLIP checkpoint in Hugging Face layout")
    llm: str | None = knob(None, "pretrained LLaMA-family folder (config.json, safetensors, "
                           "tokenizer.model)")
    minigpt4: bool = knob(False, "MiniGPT-4: needs --vision BLIP2 and --llm VICUNA; picks the "
                          "minigpt4 preset (vicuna template, 224 px, frozen towers, LoRA r=8)")
    template: str = knob("plain", "conversation template around the prompt, for chat LLMs",
                         choices=TEMPLATES)
    fusion: str = knob("per-image", "per-image: one Q-Former pass and one prompt slot per "
                       "modality; early: all modalities' ViT tokens in one pass, one slot (the "
                       "blog's variant)",
                       choices=("per-image", "early"))
    image_size: int | None = knob(None, "pixels the images are resized to", range=(8, 4096))
    crop: str = knob("none", "the part of each image the model reads: none, the whole image; "
                     "head, one square window around the head (or brain) per study, the same for "
                     "its modalities, found where the pixels stand out of the background "
                     "(data.head_window); answers are mapped back to the whole image",
                     choices=CROPS)
    patch_size: int | None = knob(None, "ViT patch size", range=(1, 256))
    vit_width: int | None = knob(None, "ViT width", range=(8, 16384))
    vit_depth: int | None = knob(None, "ViT blocks", range=(1, 256))
    vit_heads: int | None = knob(None, "ViT heads", range=(1, 256))
    vit_stem: str | None = knob(None, "from-scratch ViT patch embedding: patch (one strided "
                                "conv, the lightest), conv (a 3x3 conv at full resolution, then "
                                "one stride-2 3x3 conv per halving), cnn (two 3x3 convs and a "
                                "max-pool per halving: the heavy hybrid stem)",
                                choices=("patch", "cnn", "conv"))
    stem_stride: int = knob(1, "stride of the conv stem's first 3x3 conv: 1 at full resolution; 2 "
                            "halves at once, so no layer runs at the image's full resolution (with "
                            "twice the image size and patch size, the same grids as stride 1)",
                            range=(1, 2))
    stem_channels: int = knob(16, "channels of the conv stem's first conv, the layer on the most "
                              "pixels: with --stem-stride 2, more of them keep what the halving "
                              "would lose", range=(1, 4096))
    num_query: int | None = knob(None, "Q-Former queries = tokens per image", range=(1, 1024))
    qformer_width: int | None = knob(None, "Q-Former width", range=(8, 16384))
    qformer_depth: int | None = knob(None, "Q-Former layers", range=(1, 256))
    qformer_heads: int | None = knob(None, "Q-Former heads", range=(1, 256))
    cross_every: int = knob(1, "Q-Former cross-attention every k-th layer", range=(1, 256))
    pooled_queries: bool = knob(False, "from-scratch Q-Former: each query starts with its "
                                "region of the image grid, average-pooled")
    dim: int | None = knob(None, "LLM width", range=(8, 65536))
    n_layers: int | None = knob(None, "LLM layers", range=(1, 1024))
    n_heads: int | None = knob(None, "LLM heads", range=(1, 1024))
    n_kv_heads: int | None = knob(None, "LLM key/value heads (grouped-query attention)",
                                  range=(1, 1024))
    num_bins: int = knob(64, "location bins per coordinate", range=(2, 4096))
    box_head: str = knob("tokens", "tokens: the box is read from the answered location tokens; "
                         "regress: the blog's MLP on the hidden state at <box>, trained with L1 + "
                         "GIoU beside the token loss, answers instead",
                         choices=("tokens", "regress"))
    loc_sigma: float = knob(0.0, "label smoothing over neighbouring location bins, Gaussian std in "
                            "bins (0 = one-hot)", range=(0.0, 1000.0))
    patch_loss: float = knob(0.0, "weight of the auxiliary loss where each ViT patch predicts how "
                             "much of it the box covers (0 = off)", range=(0.0, 1000.0))
    patch_cells: int = knob(1, "the patch loss asks each patch for the box's share of k x k cells "
                            "of it: finer targets for large patches", range=(1, 64))
    second_look: bool = knob(False, "answer each box twice: then again through a square window "
                             "zoomed around it, twice its longer side (data.zoom_window); "
                             "training adds to every row with a box one view zoomed around it, "
                             "jittered as a first answer is off. Slices only: --volume answers "
                             "once")
    flip_average: bool | None = knob(None, "answer with the mean of the box and the mirrored "
                                     "box of the mirrored study (None: on when --augment flips)")
    max_boxes: int = knob(1, "boxes per answer; rows with more keep the largest", range=(1, 64))
    box_format: str = knob("corners", "how boxes are written in the jsonl: two opposite corners, "
                           "e.g. [maxx, maxy, minx, miny], or COCO [x, y, w, h]",
                           choices=("corners", "xywh"))
    lora_rank: int = knob(0, "LoRA rank on the LLM's q and v projections (0 = off)",
                          range=(0, 4096))
    lora_alpha: float = knob(16.0, "LoRA alpha", range=(0.0, 1e6))


@dataclass
class Data:
    """Where the rows come from and how they are shown to the model."""
    data: str | None = knob(None, "training summary.jsonl (None: make the demo dataset under "
                            "OUT/demo and train on it)")
    val: str | None = knob(None, "validation summary.jsonl (None: a patient-level split of --data)")
    val_fraction: float = knob(0.2, "share of patients held out when --val is not given",
                               range=(0.01, 0.9))
    augment: bool = knob(True, "random flips, zoom, shifts, small rotations and intensity jitter "
                         "that move the boxes with the pixels")
    augment_strength: float = knob(1.0, "multiplies every augmentation range of data.Augment",
                                   range=(0.0, 10.0))
    cache_features: bool = knob(False, "with a frozen ViT and --no-augment: run the ViT once per "
                                "image and train on its stored output (the same result, less work)")
    out: str = knob("out", "output folder: checkpoint, metrics.jsonl, curves.png")


@dataclass
class Train:
    """The optimisation and the run around it."""
    preset: str | None = knob(None, "the named recipe the unset settings come from (None: cpu or "
                              "gpu, by the device; minigpt4 with --minigpt4)",
                              choices=("cpu", "gpu", "minigpt4", "tiny"))
    freeze_vit: bool = knob(False, "do not train the ViT")
    freeze_qformer: bool = knob(False, "do not train the Q-Former (its output Linear still trains)")
    freeze_llm: bool = knob(False, "do not train the LLM (LoRA adapters, if any, still train)")
    grad_checkpoint: bool = knob(False, "activation checkpointing of the LLM's blocks: less "
                                 "memory, one more forward per step (large shapes)")
    batch_size: int = knob(32, "samples per step on each process", range=(1, BIG))
    grad_accum: int = knob(1, "micro-batches accumulated per step (divides --batch-size)",
                           range=(1, BIG))
    lr: float = knob(1e-3, "peak learning rate", range=(1e-12, math.inf))
    min_lr_ratio: float = knob(0.1, "final learning rate as a share of the peak", range=(0.0, 1.0))
    warmup_steps: int = knob(100, "linear warmup steps", range=(0, BIG))
    weight_decay: float = knob(0.05, "AdamW weight decay on matrices", range=(0.0, 10.0))
    grad_clip: float = knob(1.0, "gradient norm clip (0 = off)", range=(0.0, 1e9))
    max_steps: int | None = knob(None, "stop after this many steps (None: the time budget decides; "
                                 "given alone, the preset's clock does not also apply)",
                                 range=(1, BIG))
    max_minutes: float | None = knob(None, "time budget: stop, evaluate and save when it runs out",
                                     range=(0.001, 1e7))
    decay_steps: int | None = knob(None, "steps of the cosine decay (None: --max-steps; with "
                                   "only a time budget the decay follows the clock)",
                                   range=(1, BIG))
    ema: float = knob(0.0, "decay per step of an exponential moving average of the trained "
                      "weights; the average is what is evaluated, saved and answers (0 = off; "
                      "on, a second copy of the model in memory)",
                      range=(0.0, 0.99999))
    eval_every: int = knob(200, "evaluate and save every N steps", range=(1, BIG))
    log_every: int = knob(25, "progress line every N steps", range=(1, BIG))
    seed: int = knob(0, "seed for initialisation, data order and the split", range=(0, 2**63 - 1))
    resume: bool = knob(False, "continue from the checkpoint in --out with its own settings")
    overwrite: bool = knob(False, "start afresh in an --out that holds a checkpoint, replacing it "
                           "at the first save (default: refuse)")
    device: str | None = knob(None, "cpu or cuda (None: cuda when available)")
    compile: bool | None = knob(None, "torch.compile the model (None: on CUDA)")
    bf16: bool | None = knob(None, "bf16 autocast on CUDA (None: on); the CPU trains in float32 "
                             "(bf16 autocast made its step slower, docs/results.md)")


@dataclass
class Settings(Train, Data, Shape):
    """A whole run: the fields of Shape, Data and Train, flat (settings.lr, settings.image_size)."""

    def __post_init__(self):
        if self.flip_average is None:  # a model trained with random flips answers both ways
            self.flip_average = self.augment

    def to_dict(self) -> dict:
        return asdict(self)


SHAPE_FIELDS = tuple(f.name for f in fields(Shape))  # fixed on --resume
# the knobs of the conv stem alone, at their field defaults: what another stem (or a pretrained
# tower) gets where a preset made for the conv stem sets them
CONV_STEM = {f.name: f.default for f in fields(Shape) if f.name in ("stem_stride", "stem_channels")}
VIT_FIELDS = ("image_size", "patch_size", "vit_width", "vit_depth", "vit_heads", "vit_stem")

# The presets: what each named recipe sets. The CPU recipe trains in minutes on 2 cores; the GPU
# recipe fills an H200-class GPU; minigpt4 is the GPU recipe around pretrained BLIP-2 and Vicuna;
# tiny is the CPU recipe's sizes in the plain layout transformers also has (bench.py's peer).
PRESETS = {
    "cpu": dict(image_size=64, crop="head", second_look=True, patch_size=16, vit_width=128,
                vit_depth=4, vit_heads=4, vit_stem="conv", stem_stride=2, stem_channels=32,
                num_query=4, qformer_width=128, qformer_depth=2, qformer_heads=4,
                pooled_queries=True, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, num_bins=64,
                loc_sigma=1.0, box_head="regress", patch_loss=3.0, patch_cells=2, batch_size=32,
                lr=1e-3, warmup_steps=100, ema=0.995, max_minutes=8.0, eval_every=500),
    "gpu": dict(image_size=128, crop="head", second_look=True, patch_size=16, vit_width=384,
                vit_depth=8, vit_heads=6, vit_stem="conv", num_query=16, qformer_width=384,
                qformer_depth=2, qformer_heads=6, pooled_queries=True, dim=512, n_layers=8,
                n_heads=8, n_kv_heads=4, num_bins=128, loc_sigma=1.0, box_head="regress",
                patch_loss=3.0, patch_cells=2, batch_size=64, lr=5e-4, warmup_steps=200,
                ema=0.995, max_minutes=8.0, eval_every=500),
}
# bench.py's CPU shape: the CPU recipe's widths with the layout the transformers peer also builds
PRESETS["tiny"] = dict(PRESETS["cpu"], vit_stem="patch", **CONV_STEM, patch_size=8, num_query=16,
                       pooled_queries=False)


def pretrained(values: dict) -> dict:
    """A pretrained vision folder brings its own ViT sizes (None here: the folder's, read by
    MiniGPT.build), and its towers train as they were trained: plain queries, no patch loss. The
    preset's image size stays only where it names one for pretrained towers (minigpt4's 224)."""
    keep = {"image_size"} if values.get("minigpt4") else set()
    return dict(values, **{k: None for k in VIT_FIELDS if k not in keep},
                pooled_queries=False, patch_loss=0.0)


# no --ema: its average would be a second copy of the whole 7B model for a few adapters
PRESETS["minigpt4"] = pretrained(dict(PRESETS["gpu"], minigpt4=True, template="vicuna",
                                      image_size=224, freeze_vit=True, freeze_qformer=True,
                                      freeze_llm=True, lora_rank=8, ema=0.0))


# -----------------------------------------------------------------------------
# Flags: one per field, its help ending in each preset's value

def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def value_type(f):
    """int, float, str or bool: the field's type without its None."""
    t = f.type
    if isinstance(t, types.UnionType):
        t = next(a for a in t.__args__ if a is not type(None))
    return t


def parser(description=None) -> argparse.ArgumentParser:
    """train.py's command line. Unset flags do not appear in the parsed namespace (SUPPRESS), so
    what was given is known apart from what the preset fills in."""
    p = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: fail(f"{message} (see --help)")  # one line, not the whole usage
    for cls, title in ((Data, "data"), (Shape, "model (a pretrained folder brings its own sizes)"),
                       (Train, "optimisation and the run")):
        g = p.add_argument_group(title)
        for f in fields(cls):
            t = value_type(f)
            by_preset = [f"{n} {v[f.name]}" for n, v in PRESETS.items() if f.name in v]
            if len(by_preset) == len(PRESETS):  # every preset says: those values
                help_ = f"{f.metadata['help']} ({', '.join(by_preset)})"
            else:
                help_ = f"{f.metadata['help']} (default {f.default}" + (
                    f"; {', '.join(by_preset)}" if by_preset else "") + ")"
            if t is bool:
                g.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, help=help_)
            else:
                g.add_argument(flag(f.name), type=t, choices=f.metadata["choices"], help=help_,
                               metavar=None if f.metadata["choices"] else f.name.upper())
    return p


def fail(message):
    raise SettingError(message)


def parse(argv=None, description=None, cuda=False) -> tuple[Settings, dict]:
    """Command line -> (settings, the flags given as {field: value}). The unset fields come from the
    preset (--preset, else minigpt4 with --minigpt4, else cpu or gpu by the device), adjusted for a
    pretrained vision folder; then every field is checked (validate)."""
    given = vars(parser(description).parse_args(argv))
    device = given.get("device") or ("cuda" if cuda else "cpu")
    name = given.get("preset") or ("minigpt4" if given.get("minigpt4") else
                                   "gpu" if device.startswith("cuda") else "cpu")
    on_cuda = device.startswith("cuda")
    values = dict(PRESETS[name], preset=name, device=device, compile=on_cuda, bf16=on_cuda)
    if given.get("vision"):
        values = pretrained(values)
    if given.get("vit_stem", values.get("vit_stem")) != "conv":  # another stem: the conv stem's
        values.update({k: CONV_STEM[k] for k in CONV_STEM if k not in given})  # knobs unset
    if given.get("max_steps") and "max_minutes" not in given:  # a step count alone: no clock too
        values["max_minutes"] = None
    s = Settings(**{**values, **given})
    validate(s)
    return s, given


def resumed(saved: dict, given: dict, where) -> Settings:
    """--resume: the saved run's settings, then the flags given now. A given model-shaping flag that
    disagrees with the saved run is an error (a resumed run cannot change the shapes it trained)."""
    known = {f.name for f in fields(Settings)}
    for k in SHAPE_FIELDS:
        if k in given and k in saved and given[k] != saved[k]:
            raise CheckpointError(f"{flag(k)} {given[k]} disagrees with the checkpoint in {where} "
                                  f"({saved[k]}); drop the flag to resume, or train afresh with "
                                  f"another --out")
    known -= {"resume", "overwrite"}  # how that run was started, not how this one is
    s = Settings(**{**{k: v for k, v in saved.items() if k in known}, **given})
    validate(s)
    return s


# -----------------------------------------------------------------------------
# A run folder's settings.json: the settings the run trained with and its clock

def write_saved(folder, settings: Settings, elapsed: float):
    saved = dict(settings=settings.to_dict(), elapsed=elapsed)
    (Path(folder) / "settings.json").write_text(json.dumps(saved, indent=1))


def read_saved(folder) -> dict | None:
    """-> {"settings": {...}, "elapsed": seconds} of a checkpoint folder, or None for one from
    before settings.json existed (it answers, but cannot be resumed)."""
    path = Path(folder) / "settings.json"
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved["settings"], dict):
            raise TypeError(f"\"settings\" is a {type(saved['settings']).__name__}, not an object")
        unknown = set(saved["settings"]) - {f.name for f in fields(Settings)}
        float(saved.get("elapsed", 0.0))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    if unknown:
        raise CheckpointError(f"{path}: settings this version does not know: "
                              f"{', '.join(sorted(unknown))}")
    return saved


def validate(s: Settings):
    """Every field in its range or choices, then the rules between fields; SettingError naming the
    flag otherwise. Runs before any work."""
    for f in fields(s):
        v, t, rng, choices = (getattr(s, f.name), value_type(f), f.metadata["range"],
                              f.metadata["choices"])
        if v is None:
            if f.default is not None and f.name not in ("flip_average", "compile", "bf16"):
                fail(f"{flag(f.name)} must be set")
            continue
        if t is float and not math.isfinite(v):
            fail(f"{flag(f.name)} {v}: must be a finite number")
        if rng and not rng[0] <= v <= rng[1]:
            hi = "" if rng[1] >= BIG else f" and {rng[1]}"
            fail(f"{flag(f.name)} {v}: must be "
                 + (f"between {rng[0]}{hi}" if hi else f">= {rng[0]}"))
        if choices and v not in choices:
            fail(f"{flag(f.name)} {v}: must be one of {', '.join(choices)}")
    if s.minigpt4 and not (s.vision and s.llm):
        fail("--minigpt4 needs --vision (a BLIP-2 folder) and --llm (a Vicuna/LLaMA folder)")
    if s.vision is None:  # from scratch: every size is needed
        for k in ("image_size", "patch_size", "vit_width", "vit_depth", "vit_heads", "vit_stem",
                  "num_query", "qformer_width", "qformer_depth", "qformer_heads"):
            if getattr(s, k) is None:
                fail(f"{flag(k)} must be set for a from-scratch ViT (or give --vision)")
    for k in ("dim", "n_layers", "n_heads", "n_kv_heads"):
        if s.llm is None and getattr(s, k) is None:
            fail(f"{flag(k)} must be set for a from-scratch LLM (or give --llm)")
    if s.image_size and s.patch_size and s.image_size % s.patch_size:
        fail(f"--image-size {s.image_size}: must be a multiple of --patch-size {s.patch_size}")
    if s.vit_stem in ("cnn", "conv") and s.patch_size and s.patch_size & (s.patch_size - 1):
        fail(f"--patch-size {s.patch_size}: the {s.vit_stem} stem needs a power of two "
             f"(2, 4, 8, ...)")
    if s.vit_stem in ("cnn", "conv") and s.patch_size == 1:
        fail(f"--patch-size 1: the {s.vit_stem} stem halves at least once; use 2 or more")
    for k in CONV_STEM:
        if getattr(s, k) != CONV_STEM[k] and s.vit_stem != "conv":
            fail(f"{flag(k)} {getattr(s, k)}: only the conv stem has it (--vit-stem is "
                 f"{s.vit_stem})")
    for width, heads in (("vit_width", "vit_heads"), ("qformer_width", "qformer_heads"),
                         ("dim", "n_heads")):
        w, h = getattr(s, width), getattr(s, heads)
        if w and h and w % h:
            fail(f"{flag(width)} {w}: must be a multiple of {flag(heads)} {h}")
    if s.n_heads and s.n_kv_heads and s.n_heads % s.n_kv_heads:
        fail(f"--n-heads {s.n_heads}: must be a multiple of --n-kv-heads {s.n_kv_heads}")
    if s.batch_size % s.grad_accum:
        fail(f"--batch-size {s.batch_size}: must be a multiple of --grad-accum {s.grad_accum}")
    if s.cache_features and (not s.freeze_vit or s.augment):
        fail("--cache-features needs a frozen ViT (--freeze-vit or --minigpt4) and --no-augment "
             "(augmented pixels change every step, so their features cannot be stored)")
    if s.resume and s.overwrite:
        fail("--resume and --overwrite contradict each other: --resume continues the checkpoint in "
             "--out, --overwrite replaces it")
    if not (s.max_steps or s.max_minutes):
        fail("give --max-steps or --max-minutes: nothing would stop the run")
