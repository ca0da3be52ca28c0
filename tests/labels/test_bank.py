import pytest
import torch

from selfclust.labels.bank import LabelBank


def test_lookup_by_global_index_not_position():
    bank = LabelBank(heads=2, num_samples=6, clusters=3)
    new = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 1, 1, 0, 0]])
    assert bank.assign(new) == pytest.approx(8 / 12)  # 4 of 12 were already 0
    idx = torch.tensor([5, 0, 3])
    assert bank.lookup(idx).tolist() == [[2, 0, 0], [0, 2, 1]]
    assert bank.cluster_sizes().tolist() == [[2, 2, 2], [2, 2, 2]]


def test_state_roundtrip_and_mismatch():
    bank = LabelBank(1, 4, 2)
    bank.assign(torch.tensor([[1, 0, 1, 0]]))
    other = LabelBank(1, 4, 2)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.labels, bank.labels)
    old = LabelBank(1, 4, 2)  # a checkpoint written before the bank stopped counting versions
    old.load_state_dict({**bank.state_dict(), "version": 3})
    assert torch.equal(old.labels, bank.labels)
    with pytest.raises(ValueError, match="dataset or method"):
        LabelBank(1, 5, 2).load_state_dict(bank.state_dict())


def test_rejects_out_of_range_labels():
    bank = LabelBank(1, 3, 2)
    with pytest.raises(ValueError, match="0..1"):
        bank.assign(torch.tensor([[0, 1, 2]]))


def test_compact_labels_int64_lookups_and_old_checkpoints():
    """The bank stores int16 ids (int32 past 32,767 clusters); lookups give int64 for the
    cross-entropy, and a checkpoint written with an int64 bank loads."""
    from selfclust.labels.bank import label_dtype

    assert label_dtype(3000) == torch.int16 and label_dtype(32_767) == torch.int16
    assert label_dtype(32_768) == torch.int32
    bank = LabelBank(2, 5, 3000)
    new = torch.tensor([[0, 2999, 7, 7, 1], [5, 4, 3, 2, 1]])
    bank.assign(new)
    assert bank.labels.dtype == torch.int16 and torch.equal(bank.labels.long(), new)
    got = bank.lookup(torch.tensor([1, 4]))
    assert got.dtype == torch.int64 and got.tolist() == [[2999, 1], [4, 1]]
    assert bank.cluster_sizes()[0, 7] == 2 and bank.cluster_sizes().sum() == 10
    old = LabelBank(2, 5, 3000)
    old.load_state_dict({"labels": new.clone(), "clusters": 3000})  # int64, as saved before
    assert old.labels.dtype == torch.int16 and torch.equal(old.labels, bank.labels)


def test_gather_bank_keeps_the_banks_type():
    from selfclust.collectives import WORLD
    from selfclust.labels.label_pass import gather_bank

    fill = torch.zeros(1, 4, dtype=torch.int16)
    got = gather_bank(torch.tensor([[3, 1, 2]]), torch.tensor([0, 2, 3]), 4, group=WORLD,
                      skipped=1, fill=fill)  # fmt: skip
    assert got.dtype == torch.int16 and got.tolist() == [[3, 0, 1, 2]]
