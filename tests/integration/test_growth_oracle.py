"""Growth judged by an independent oracle: a random-init transformers Llama (tests/conftest.py),
imported, grown by Scale-Up or Scale-Out, exported to HF and run in transformers. A function-
preserving growth (exact width at an integer and a non-integer ratio, identity depth, coarse and
granular Scale-Out with exact scaling) gives the *source* HF model's logits (fp32, max rel 1e-4
of the logits' scale, top-1 equal); one that is not (AKI-Pro + stack, Drop-Upcycling) loads in
transformers and computes what the engine computes on the grown checkpoint."""

import json
from pathlib import Path

import pytest
import torch

from engine.convert.exporter import engine_to_hf
from engine.convert.verify import hf_logits, random_tokens, verify
from engine.models.measure import compare_logits
from engine.upcycle.commands import scale_out_checkpoint, scale_up_checkpoint

pytestmark = pytest.mark.slow

REL = 1e-4  # fp32 through two implementations; exact growth measures ~1e-6
SOURCE = "llama2"  # 2 layers x 64, 4 heads (MHA), FFN 160, vocabulary 1000
GROWTHS = {  # name: (command, options, function preserving)
    "width_x2_exact": (scale_up_checkpoint, dict(hidden_size=128, ffn_hidden_size=320,
                                                 num_attention_heads=8, num_query_groups=8,
                                                 width_method="exact"), True),
    "width_x1.5_exact": (scale_up_checkpoint, dict(hidden_size=96, ffn_hidden_size=240,
                                                   num_attention_heads=6, num_query_groups=6,
                                                   width_method="exact"), True),
    "depth_identity": (scale_up_checkpoint, dict(num_layers=5, depth_method="identity"), True),
    "moe_coarse": (scale_out_checkpoint, dict(num_experts=4, topk=2), True),
    "moe_granular_exact": (scale_out_checkpoint, dict(num_experts=4, topk=2, granularity=2,
                                                      weight_scaling="exact"), True),
    "aki_pro_stack": (scale_up_checkpoint, dict(hidden_size=128, ffn_hidden_size=320,
                                                num_attention_heads=8, num_query_groups=4,
                                                num_layers=4, width_method="aki-pro",
                                                depth_method="stack"), False),
    "moe_drop_upcycling": (scale_out_checkpoint, dict(num_experts=4, topk=2,
                                                      drop_upcycling=0.5), False),
}


@pytest.mark.parametrize("name", GROWTHS)
def test_growth_in_transformers(hf_models, converted, tmp_path, name):
    command, options, preserving = GROWTHS[name]
    grown = tmp_path / "grown"
    report = command(converted[SOURCE], grown, eval_samples=0, **options)
    hf = engine_to_hf(grown, tmp_path / "hf", dtype="fp32", progress=False).path
    config = json.loads((Path(hf) / "config.json").read_text())
    source_dir, _ = hf_models[SOURCE]
    tokens = random_tokens(1000, batch=2, seq=128, seed=3)
    theirs = hf_logits(hf, tokens)
    assert torch.isfinite(theirs).all()
    if command is scale_out_checkpoint:
        assert config["architectures"] == ["MixtralForCausalLM"]
    exported = verify(hf, grown, seq=128)  # the export computes what the engine computes
    assert exported.max_rel <= REL and exported.top1 == 1.0, exported.line()
    diff = compare_logits(hf_logits(source_dir, tokens), theirs, vocab_size=1000,
                          dtype=torch.float32)
    if preserving:
        assert diff.max_rel <= REL and diff.top1 == 1.0, (report.get("invariant"), diff.line())
    else:  # a different function, and the export says so by more than noise
        assert diff.max_rel > 100 * REL, diff.line()
