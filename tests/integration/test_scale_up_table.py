"""The small-scale analogue of AquilaMoE's Table 1 (arXiv 2408.06567): a tiny Llama trained for a
while, grown 4 -> 6 layers, hidden 64 -> 128, FFN 128 -> 256, 4 -> 8 heads in 2 KV groups, then
trained N more steps; validation loss at step 0 and step N per initialization, against the same
model from random init. Run with `-s` to see the table:

    .venv/bin/pytest -s tests/integration/test_scale_up_table.py
"""

import pytest

from engine.checkpoint.unsharded import evaluate, read_unsharded
from engine.config.loader import recipe_from_dict, recipe_to_dict
from engine.train.loop import train
from engine.upcycle.commands import scale_up_checkpoint
from engine.upcycle.invariant import measurement_tokens

pytestmark = pytest.mark.slow

SOURCE_STEPS, STEPS = 60, 30
TARGET = dict(num_layers=6, hidden_size=128, ffn_hidden_size=256, num_attention_heads=8)
ROWS = {"FPI + stack": ("fpi", "stack"), "FPI + interpolate": ("fpi", "interpolate"),
        "AKI-Pro + interpolate": ("aki-pro", "interpolate"),
        "exact + identity": ("exact", "identity")}


def _continue(ckpt, save, steps: int) -> dict:
    """The recipe stored with `ckpt`, trained `steps` steps from its weights into `save`."""
    plain = recipe_to_dict(read_unsharded(ckpt).recipe)
    plain["train"].update(steps=steps, schedule={"style": "cosine", "warmup_steps": 1,
                                                 "min_lr": 1e-4})
    plain["checkpoint"].update(save=str(save), pretrained=str(ckpt))
    return plain


def test_grown_models_start_and_stay_ahead_of_random_init(make_recipe, tmp_path):
    source = train(recipe_from_dict(make_recipe(
        train={"steps": SOURCE_STEPS}, checkpoint={"save": str(tmp_path / "source")})))
    model = read_unsharded(source.checkpoint)
    tokens, _ = measurement_tokens(model.recipe, samples=16, seq_length=512, seed=0)
    source_loss = evaluate(model.recipe, model.state, tokens)[0]

    def loss(ckpt) -> float:
        m = read_unsharded(ckpt)
        return evaluate(m.recipe, m.state, tokens)[0]

    def losses(start) -> tuple[float, float]:
        end = train(recipe_from_dict(_continue(start, tmp_path / f"{start.name}-trained",
                                               STEPS))).checkpoint
        return loss(start), loss(end)

    random_recipe = make_recipe(model=TARGET, train={"steps": 0, "schedule": {"warmup_steps": 0}},
                                checkpoint={"save": str(tmp_path / "random")})
    train(recipe_from_dict(random_recipe))
    table = {"random init": losses(tmp_path / "random")}
    for name, (width, depth) in ROWS.items():
        out = tmp_path / name.replace(" + ", "-")
        scale_up_checkpoint(source.checkpoint, out, **TARGET, width_method=width,
                            depth_method=depth, eval_samples=0)
        table[name] = losses(out)

    print(f"\nsource (4 layers, hidden 64, trained {SOURCE_STEPS} steps): {source_loss:.5f}")
    print(f"| init | step-0 valid loss | after {STEPS} steps |\n|---|---|---|")
    for name, (start, end) in table.items():
        print(f"| {name} | {start:.5f} | {end:.5f} |")
    assert table["exact + identity"][0] == pytest.approx(source_loss, rel=1e-6)
    for name in ROWS:
        assert table[name][0] < table["random init"][0] and \
            table[name][1] < table["random init"][1], name
