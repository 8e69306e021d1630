"""
The run folder that train.py writes and train.py --resume, sample.py and bench.py read:

    OUT/ckpt/model.safetensors   the weights (MiniGPT.save_pretrained)
    OUT/ckpt/config.json         the model's config; under "meta" what an answer needs besides the
                                 weights: modalities, image size, normalisation, box format,
                                 template
    OUT/ckpt/settings.json       the run's settings (config.Settings) and its training clock
    OUT/ckpt/tokenizer.model     the sentencepiece model, location tokens included
    OUT/ckpt/val.jsonl           the validation rows the run scored (image paths absolute)
    OUT/ckpt/train_state.pt      optimiser moments and the step, for --resume

save() writes it under OUT/ckpt.tmp and swaps it in, so a crash never leaves half of one; load()
reads it strictly, and every problem is a CheckpointError naming the file.
"""

import json
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import torch

import data
from config import CheckpointError, Settings
from model import MiniGPT

NAMES = ("ckpt", "ckpt.old")  # the checkpoint, and the one being replaced during a save


@dataclass
class Run:
    """A loaded checkpoint folder."""
    folder: Path
    model: MiniGPT  # in eval mode, on the CPU
    meta: dict  # modalities, image_size, mean, std, box_format, template
    tokenizer: data.Tokenizer
    saved: dict | None  # settings.json: {"settings": {...}, "elapsed": s}; None before it existed

    @property
    def val_rows(self) -> Path:
        return self.folder / "val.jsonl"


def save(out, model, tokenizer, meta, settings: Settings, val_samples, optimizer, step, elapsed):
    """Write OUT/ckpt whole: under ckpt.tmp first, then renamed over the old one."""
    out = Path(out)
    tmp, final, old = out / "ckpt.tmp", out / "ckpt", out / "ckpt.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, extra=meta)
    shutil.copyfile(tokenizer.model_path, tmp / "tokenizer.model")
    saved = dict(settings=settings.to_dict(), elapsed=elapsed)
    (tmp / "settings.json").write_text(json.dumps(saved, indent=1))
    (tmp / "val.jsonl").write_text("".join(json.dumps(row) + "\n" for row in
                                           val_rows(val_samples, meta["modalities"])))
    torch.save({"step": step, "optimizer": optimizer.state_dict()}, tmp / "train_state.pt")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def val_rows(samples, modalities):
    """The validation rows as summary.jsonl rows that read from anywhere: image paths absolute, the
    patient under "case"."""
    keys = [f"{m}_path" for m in modalities]
    return [{**s.row, **dict(zip(keys, s.paths)), "case": s.case} for s in samples]


def find(path) -> Path:
    """A checkpoint folder holds model.safetensors; train.py's --out folder holds one under
    ckpt/."""
    path = Path(path)
    for folder in (path, path / "ckpt"):
        if (folder / "model.safetensors").exists() and (folder / "config.json").exists():
            return folder
    raise CheckpointError(f"no checkpoint in {path}: expected "
                          f"{path / 'ckpt' / 'model.safetensors'} "
                          f"(train one with `python train.py --out {path}`) or a folder holding "
                          f"model.safetensors and config.json")


def load(folder) -> Run:
    """-> the Run in a checkpoint folder. A checkpoint from before settings.json answers as it did,
    but cannot be resumed (load_train_state says so)."""
    folder = Path(folder)
    model = MiniGPT.from_checkpoint(folder)
    meta = json.loads((folder / "config.json").read_text()).get("meta")
    if not isinstance(meta, dict) or "modalities" not in meta:
        raise CheckpointError(f"{folder / 'config.json'}: no \"meta\" with the data settings "
                              f"(not written by train.py)")
    if not (folder / "tokenizer.model").is_file():
        raise CheckpointError(f"{folder / 'tokenizer.model'}: missing (train.py writes it beside "
                              f"the weights)")
    tokenizer = data.Tokenizer(folder / "tokenizer.model", model.cfg.num_bins)
    saved = None
    if (folder / "settings.json").exists():
        try:
            saved = json.loads((folder / "settings.json").read_text())
            unknown = set(saved["settings"]) - {f.name for f in fields(Settings)}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{folder / 'settings.json'}: cannot be read ({e})") from None
        if unknown:
            raise CheckpointError(f"{folder / 'settings.json'}: settings this version does not "
                                  f"know: {', '.join(sorted(unknown))}")
    return Run(folder, model.eval(), meta, tokenizer, saved)


def load_train_state(folder) -> dict:
    """--resume: the optimiser state and step of a checkpoint folder (which load() read)."""
    folder = Path(folder)
    if not (folder / "settings.json").exists():
        raise CheckpointError(f"{folder / 'settings.json'}: missing (written by an older "
                              f"train.py); this checkpoint answers but cannot be resumed")
    try:
        return torch.load(folder / "train_state.pt", map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{folder / 'train_state.pt'}: missing; the checkpoint cannot be "
                              f"resumed") from None
    except Exception as e:  # torch raises several types for damaged files
        raise CheckpointError(f"{folder / 'train_state.pt'}: cannot be read ({e})") from None
