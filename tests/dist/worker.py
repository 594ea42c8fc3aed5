"""Run under torchrun by the distributed tests: several training runs in one launch.

argv: SPEC.json OUT.json. SPEC is {"runs": [{"name": ..., "recipe": {...}}, ...]}; each run is a
full `train()` (parallel state set up and torn down), so one launch (one megatron-core import,
~7 s per process) serves many layouts. Rank 0 writes {name: {losses, grad_norms, valid, drift,
layout}} (`layout`: what megatron's parallel state says ran).
A run with "without_compat_p2p": true trains with megatron's default batched p2p on gloo, to
show the trap the compat layer closes.
"""

import json
import os
import sys


def main() -> None:
    from engine.config.loader import recipe_from_dict
    from engine.train.loop import train

    from engine.compat import cpu

    spec = json.loads(open(sys.argv[1]).read())
    results = {}
    for run in spec["runs"]:
        cpu.BATCH_P2P_ON_GLOO = bool(run.get("without_compat_p2p"))
        result = train(recipe_from_dict(run["recipe"], source=run["name"]))
        results[run["name"]] = {
            "losses": result.losses,
            "grad_norms": result.grad_norms,
            "valid": result.valid,
            "drift": result.drift,
            "layout": result.layout,
        }
    if os.environ.get("RANK", "0") == "0":
        with open(sys.argv[2], "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
