"""Model families (as data), the layer specs and the megatron-core model builder.

`FAMILIES` is the one registry: keyed by the recipe's `model.family`; HF architectures are looked
up through each family's `hf_architectures`, never by name substrings.
"""

import difflib

from engine.config.errors import ConfigError
from engine.models.family import Family
from engine.models.llama import AQUILA, LLAMA, MISTRAL, MIXTRAL, QWEN2, QWEN2_MOE

FAMILIES: dict[str, Family] = {
    f.name: f for f in (LLAMA, MISTRAL, QWEN2, AQUILA, MIXTRAL, QWEN2_MOE)
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        close = difflib.get_close_matches(name, FAMILIES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"model.family: unknown family '{name}'{hint}; known: {', '.join(sorted(FAMILIES))}"
        ) from None


def family_for_hf_architecture(architecture: str) -> Family:
    for family in FAMILIES.values():
        if architecture in family.hf_architectures:
            return family
    known = sorted(a for f in FAMILIES.values() for a in f.hf_architectures)
    raise ConfigError(
        f"unsupported HF architecture '{architecture}'; supported: {', '.join(known)}"
    )
