"""config.py: the settings' presets, flags, validation and --resume rules."""

from dataclasses import fields

import pytest

import config
import data
from config import PRESETS, CheckpointError, SettingError, Settings
from model import shape_parts
from vision import ViT


def test_every_field_has_help_and_every_preset_names_known_fields():
    names = {f.name for f in fields(Settings)}
    for f in fields(Settings):
        assert f.metadata["help"], f.name
    for name, values in PRESETS.items():
        assert set(values) <= names, name
    assert set(config.TEMPLATES) == set(data.TEMPLATES)
    assert config.CROPS == data.CROPS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid(name):
    extra = ["--vision", "v", "--llm", "l"] if name == "minigpt4" else []
    s, given = config.parse(["--preset", name, *extra])
    assert s.preset == name and given["preset"] == name
    for k, v in PRESETS[name].items():
        assert getattr(s, k) == v, k


def test_help_shows_each_presets_value():
    text = config.parser().format_help()
    assert "(cpu 32, gpu 64, tiny 32, minigpt4 64)" in " ".join(text.split())  # --batch-size


def test_the_preset_follows_the_device_and_given_flags_win():
    s, given = config.parse([])
    assert (s.preset, s.device, s.compile, s.bf16, s.vit_width) == ("cpu", "cpu", False, False, 128)
    assert given == {}
    s, given = config.parse(["--vit-width", "64", "--vit-heads", "2"], cuda=True)
    assert (s.preset, s.device, s.compile, s.bf16) == ("gpu", "cuda", True, True)
    assert (s.vit_width, s.vit_depth) == (64, PRESETS["gpu"]["vit_depth"])
    assert given == {"vit_width": 64, "vit_heads": 2}
    s, _ = config.parse(["--max-steps", "5"])
    assert s.max_minutes is None  # a step count given alone is not also cut by the preset's clock
    s, _ = config.parse(["--max-steps", "5", "--max-minutes", "2"])
    assert s.max_minutes == 2


def test_a_pretrained_vision_folder_brings_its_own_sizes():
    s, _ = config.parse(["--vision", "blip2"])
    assert all(getattr(s, k) is None for k in config.VIT_FIELDS)
    assert s.pooled_queries is False and s.patch_loss == 0.0 and s.dim == PRESETS["cpu"]["dim"]
    s, _ = config.parse(["--vision", "blip2", "--image-size", "96", "--patch-loss", "0.5"])
    assert s.image_size == 96 and s.patch_loss == 0.5 and s.vit_width is None
    s, _ = config.parse(["--minigpt4", "--vision", "v", "--llm", "l"])
    assert (s.preset, s.image_size, s.template, s.lora_rank, s.freeze_vit) == \
        ("minigpt4", 224, "vicuna", 8, True)


@pytest.mark.parametrize("argv, words", [
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--num-bins", "1"], "--num-bins 1: must be between 2 and 4096"),
    (["--max-minutes", "-1"], "--max-minutes -1.0"),
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--lr", "0"], "--lr 0.0"),
    (["--val-fraction", "1"], "--val-fraction 1.0"),
    (["--image-size", "30", "--patch-size", "8"],
     "--image-size 30: must be a multiple of --patch-size 8"),
    (["--image-size", "48", "--patch-size", "6", "--vit-stem", "cnn"],
     "--patch-size 6: the cnn stem needs a power of two"),
    (["--image-size", "48", "--patch-size", "6"],
     "--patch-size 6: the conv stem needs a power of two"),
    (["--patch-cells", "0"], "--patch-cells 0"),
    (["--stem-stride", "3"], "--stem-stride 3: must be between 1 and 2"),
    (["--stem-stride", "2", "--vit-stem", "cnn"], "--stem-stride 2: only the conv stem has it"),
    (["--stem-channels", "32", "--vit-stem", "patch"],
     "--stem-channels 32: only the conv stem has it"),
    (["--vit-width", "100", "--vit-heads", "3"],
     "--vit-width 100: must be a multiple of --vit-heads 3"),
    (["--n-heads", "4", "--n-kv-heads", "3"], "--n-heads 4: must be a multiple of --n-kv-heads 3"),
    (["--batch-size", "6", "--grad-accum", "4"],
     "--batch-size 6: must be a multiple of --grad-accum 4"),
    (["--minigpt4"], "--minigpt4 needs --vision"),
    (["--cache-features"], "--cache-features needs a frozen ViT"),
    (["--resume", "--overwrite"], "contradict"),
    (["--box-head", "circle"], "--box-head"),
    (["--batch-size", "x"], "--batch-size"),
])
def test_bad_settings_name_the_flag(argv, words):
    with pytest.raises(SettingError, match=None) as e:
        config.parse(argv)
    assert words in str(e.value)


def test_resume_takes_the_saved_settings_and_the_flags_given():
    saved, _ = config.parse(["--dim", "64", "--n-heads", "4", "--max-minutes", "3", "--seed", "7"])
    s = config.resumed(saved.to_dict(), {"max_minutes": 9.0, "resume": True}, "ckpt")
    assert (s.dim, s.seed, s.max_minutes, s.resume) == (64, 7, 9.0, True)
    s = config.resumed(saved.to_dict(), {"dim": 64}, "ckpt")  # the same value: fine
    with pytest.raises(CheckpointError,
                       match=r"--dim 32 disagrees with the checkpoint in ckpt \(64\)"):
        config.resumed(saved.to_dict(), {"dim": 32}, "ckpt")
    with pytest.raises(SettingError, match="--lr nan"):
        config.resumed(saved.to_dict(), {"lr": float("nan")}, "ckpt")
    # a run started with --overwrite resumes: how it was started is not carried over
    started, _ = config.parse(["--overwrite"])
    s = config.resumed(started.to_dict(), {"resume": True}, "ckpt")
    assert s.resume and not s.overwrite


def test_another_stem_leaves_the_conv_stems_knobs_at_their_defaults():
    """The cpu preset's stride-2, 32-channel first conv belongs to its conv stem: another stem (the
    whole-study command's --vit-stem cnn, the tiny preset's patches, a pretrained tower) gets the
    defaults, and only a flag given for another stem is an error."""
    s, _ = config.parse([])
    assert (s.vit_stem, s.stem_stride, s.stem_channels) == ("conv", 2, 32)
    for argv in (["--vit-stem", "cnn"], ["--preset", "tiny"], ["--vision", "blip2"],
                 ["--preset", "gpu"]):
        s, _ = config.parse(argv)
        assert (s.stem_stride, s.stem_channels) == (1, 16), argv
    s, _ = config.parse(["--stem-stride", "1"])
    assert (s.stem_stride, s.stem_channels) == (1, 32)
    vit = ViT(shape_parts(config.parse(["--vit-stem", "cnn"])[0], vocab_size=300)["vit"])
    assert vit.patch_embed[0].stride == (1, 1) and vit.patch_embed[0].out_channels == 16


def test_shape_parts_derive_the_mlp_widths():
    parts = shape_parts(Settings(**PRESETS["cpu"]), vocab_size=300)
    assert parts["vit"].mlp_dim == 4 * 128 and parts["qformer"].mlp_dim == 4 * 128
    assert parts["qformer"].vision_width == 128 and parts["qformer"].out_dim == 128
    assert parts["llm"].hidden_dim == parts["llm"].swiglu_hidden(128)
    assert parts["vit"].stem == "conv" and parts["vit"].stem_stride == 2
    assert parts["vit"].stem_channels == 32
    s, _ = config.parse(["--image-size", "128", "--patch-size", "32", "--stem-stride", "2"])
    vit = ViT(shape_parts(s, vocab_size=300)["vit"])
    assert vit.patch_embed[0].stride == (2, 2) and vit.cfg.grid == 4
