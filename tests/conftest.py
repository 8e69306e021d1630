import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Real MRI for development lives beside the repository, never inside it.
SHARED_DATA = ROOT.parent / "shared" / "data"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("real MRI not found at ../shared/data (optional development data)")
    return SHARED_DATA


@pytest.fixture
def tiny_blip2():
    """-> make(folder, perturb=0.0), which saves a tiny random Hugging Face BLIP-2 to folder and
    returns it: ViT 24 wide at 16 px, Q-Former 16 wide with 3 queries, an OPT language model we
    never read."""
    transformers = pytest.importorskip("transformers")

    def make(folder, perturb=0.0):
        torch.manual_seed(0)
        config = transformers.Blip2Config(
            vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                               num_attention_heads=2, image_size=16, patch_size=8),
            qformer_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, cross_attention_frequency=1,
                                encoder_hidden_size=24, vocab_size=50, max_position_embeddings=16),
            text_config=dict(model_type="opt", hidden_size=32, num_hidden_layers=1, ffn_dim=32,
                             num_attention_heads=2, vocab_size=50, word_embed_proj_dim=32,
                             max_position_embeddings=64),
            num_query_tokens=3)
        blip = transformers.Blip2ForConditionalGeneration(config).eval()
        with torch.no_grad():  # default inits (norms at 1, zeros) would hide mapping mistakes
            for p in blip.parameters():
                p.add_(torch.randn_like(p) * perturb)
        blip.save_pretrained(folder)
        return blip
    return make
