"""Run under torchrun by the conversion tests: engine logits of converted checkpoints at a layout.

argv: SPEC.json. SPEC is {"jobs": [{"ckpt": ..., "tp": N, "pp": N, "ep": N, "tokens": FILE,
"out": FILE}]}.
Each job loads the checkpoint at its layout and the rank holding the gathered logits (last
pipeline stage, tensor-parallel rank 0) saves them with torch.save (tensors and the layout that
ran, read from megatron's parallel state: plain types only)."""

import json
import sys
from dataclasses import replace

import torch


def main() -> None:
    from megatron.core import parallel_state as ps

    from engine.checkpoint import load_weights
    from engine.checkpoint.unsharded import checkpoint_rows, read_recipe
    from engine.config.recipe import ParallelConfig
    from engine.models.forward import parallel_logits
    from engine.distributed import destroy_parallel_state, init_distributed, parallel_sizes
    from engine.models.build import build_model, transformer_config

    for job in json.loads(open(sys.argv[1]).read())["jobs"]:
        ckpt, recipe = read_recipe(job["ckpt"])
        moe_tp = recipe.model.moe is not None and job["tp"] > 1  # megatron: MoE + TP needs SP
        recipe = replace(recipe, parallel=ParallelConfig(tp=job["tp"], pp=job["pp"],
                                                         ep=job.get("ep", 1),
                                                         sequence_parallel=moe_tp))
        runtime = init_distributed(recipe)
        tc = transformer_config(recipe, runtime.layout, on_cpu=True, gloo=True)
        chunks = build_model(recipe, tc, padded_vocab_size=checkpoint_rows(ckpt, recipe),
                             spec="local")
        load_weights(ckpt, chunks)
        logits = parallel_logits(chunks, torch.load(job["tokens"], weights_only=True))
        if logits is not None and ps.get_tensor_model_parallel_rank() == 0 \
                and ps.get_data_parallel_rank() == 0:
            torch.save({"logits": logits, "layout": parallel_sizes()}, job["out"])
        destroy_parallel_state()


if __name__ == "__main__":
    main()
