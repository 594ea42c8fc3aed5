"""Document masking of packed samples (data.reset_attention_mask, reset_position_ids,
eod_mask_loss): through the dataset, the batch and the model's attention, each document of a
packed sample gets exactly the per-token losses it gets alone (fp32, one process), with and
without a sliding window; without the mask later documents' losses change."""

import pytest
import torch

from engine.config.loader import recipe_from_dict

SEQ = 64


@pytest.fixture(scope="module")
def packed(short_docs):
    """Four 64-token samples of the short documents, as megatron's GPTDataset makes them with
    the three keys on, collated into one microbatch; and the tokenizer's eod."""
    from engine.data.datasets import build_datasets
    from engine.data.tokenizer import load_tokenizer
    from engine.train.batches import collate

    tok = load_tokenizer("sentencepiece", short_docs["tokenizer"])
    train, _ = build_datasets(blend=[(short_docs["prefix"], 1.0)], valid={}, tokenizer=tok,
                              seq_length=SEQ, seed=3, train_samples=4, valid_samples=None,
                              reset_attention_mask=True, reset_position_ids=True,
                              eod_mask_loss=True)
    return collate([train[i] for i in range(4)]), tok.eod


def documents(tokens: torch.Tensor, eod: int) -> list[tuple[int, int]]:
    """[start, end) of each document of a packed row: an eod ends one (and belongs to it)."""
    ends = [int(i) + 1 for i in (tokens == eod).nonzero().flatten()]
    starts = [0] + ends
    return [(a, b) for a, b in zip(starts, ends + [len(tokens)], strict=True) if b > a]


@pytest.fixture
def model(make_recipe):
    """A tiny Llama (random init, fp32) in a world of one; `window` gives it a sliding window;
    `masked=False` builds it without document masking (megatron's own local attention)."""
    from engine.distributed import destroy_parallel_state, init_distributed
    from engine.models.build import build_model, transformer_config

    built = []

    def make(window=None, masked=True):
        recipe = recipe_from_dict(make_recipe(
            model={"max_position_embeddings": SEQ, "window_size": window,
                   "fused_kernels": False},
            data={"seq_length": SEQ, "reset_attention_mask": masked,
                  "reset_position_ids": masked, "eod_mask_loss": masked}))
        runtime = init_distributed(recipe)
        tc = transformer_config(recipe, runtime.layout, on_cpu=True, gloo=True)
        chunk = build_model(recipe, tc, padded_vocab_size=512, spec="local")[0].eval()
        built.append(chunk)
        return chunk

    yield make
    destroy_parallel_state()


def losses(model, tokens, labels, position_ids=None, attention_mask=None) -> torch.Tensor:
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[-1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, position_ids, attention_mask, labels=labels)


def test_the_batch_marks_documents_as_megatron_does(packed):
    batch, eod = packed
    tokens, mask = batch["tokens"], batch["attention_mask"]
    assert mask.shape == (4, 1, SEQ, SEQ) and mask.dtype == torch.bool
    spans = [documents(row, eod) for row in tokens]
    assert sum(len(s) for s in spans) >= 8  # several documents per sample
    for row, doc_spans in enumerate(spans):
        for a, b in doc_spans:
            assert batch["position_ids"][row, a:b].tolist() == list(range(b - a))
            # a token sees exactly the earlier tokens of its own document
            allowed = ~mask[row, 0, a:b]
            assert allowed[:, a:b].equal(torch.ones(b - a, b - a, dtype=torch.bool).tril())
            assert not allowed[:, :a].any() and not allowed[:, b:].any()
        assert (batch["loss_mask"][row] == (tokens[row] != eod).float()).all()


@pytest.mark.parametrize("window", [None, 8])
def test_packed_documents_have_their_own_losses(packed, model, window):
    """Per-token losses of every document in the packed batch equal the document run alone
    (its own positions 0.., no other tokens); the eod's own loss is masked (eod_mask_loss).
    The documents alone run through megatron's own local attention (a model built without
    document masking, same weights); a window of 8 tokens checks that the window and the
    document mask are both applied."""
    batch, eod = packed
    net = model(window)
    reference = model(window, masked=False)
    assert type(net.decoder.layers[0].self_attention.core_attention).__name__ == \
        "ContextParallelAttention"
    assert type(reference.decoder.layers[0].self_attention.core_attention).__name__ == \
        "DotProductAttention"
    reference.load_state_dict(net.state_dict())
    together = losses(net, batch["tokens"], batch["labels"], batch["position_ids"],
                      batch["attention_mask"])
    plain = losses(net, batch["tokens"], batch["labels"])  # packed, no document mask
    worst, compared, moved = 0.0, 0, 0.0
    for row in range(batch["tokens"].shape[0]):
        for a, b in documents(batch["tokens"][row], eod):
            alone = losses(reference, batch["tokens"][row:row + 1, a:b],
                           batch["labels"][row:row + 1, a:b])[0]
            keep = batch["loss_mask"][row, a:b].bool()
            got, want = together[row, a:b][keep], alone[keep]
            worst = max(worst, float(((got - want).abs() / want.abs()).max()))
            compared += int(keep.sum())
            if a > 0:  # a later document: without the mask it sees the earlier ones
                moved = max(moved, float((plain[row, a:b][keep] - want).abs().max()))
    print(f"window={window}: {compared} tokens, max rel diff {worst:.2e}, without the mask "
          f"{moved:.2e}")
    assert compared >= 4 * SEQ - 40
    assert worst < 1e-5, worst
    assert moved > 1e-3, moved
