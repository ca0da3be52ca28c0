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
