"""TextBatches: packed blocks -> the batch dict the text methods read."""

import torch

from selfsup.data.packing import block_attention_mask, document_positions, pack_documents
from selfsup.data.pipeline import TextBatches

DOCS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [15]]
NAMES = ["a", "b", "c", "d"]


def test_full_blocks_carry_no_attention_mask_and_count_tokens():
    blocks = pack_documents(DOCS, 4, bos_id=2, eos_id=3, pad_id=0, drop_last=True)
    batches = TextBatches(blocks, NAMES, torch.device("cpu"), document_masks=False)
    batch = batches(torch.tensor([1, 0]), torch.Generator())
    assert torch.equal(batch["input_ids"], blocks.input_ids[[1, 0]])
    assert "attention_mask" not in batch and "position_ids" not in batch, "the fast path: no mask at all"
    assert batch["num_tokens"] == 8 and bool(batch["token_mask"].all())
    assert batch["id"] == ["a+b", "a"]  # the documents whose tokens each block holds
    assert isinstance(batch["generator"], torch.Generator)


def test_padding_and_document_masks():
    blocks = pack_documents(DOCS, 4, bos_id=2, eos_id=3, pad_id=0, drop_last=False)
    last = torch.tensor([blocks.num_blocks - 1])
    plain = TextBatches(blocks, NAMES, torch.device("cpu"), document_masks=False)(last, torch.Generator())
    assert torch.equal(plain["attention_mask"], blocks.attention_mask[last])
    assert plain["num_tokens"] == int(blocks.attention_mask[last].sum()) < 4
    masked = TextBatches(blocks, NAMES, torch.device("cpu"), document_masks=True)(torch.arange(3), torch.Generator())
    assert torch.equal(masked["attention_mask"], block_attention_mask(blocks.document_ids[:3], causal=False))
    assert torch.equal(masked["position_ids"], document_positions(blocks.document_ids[:3]))
