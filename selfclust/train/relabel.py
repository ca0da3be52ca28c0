"""Label updates: when they happen (the schedule), and what each one does and records.

A label update embeds every sample once over all ranks (the method's features), asks the
method for this rank's new labels, gathers them into every rank's bank (only labels travel),
and logs what changed. The method decides *how* labels are made (Sinkhorn, k-means, UMAP +
GMM, its own targets); this module is the same for all of them.
"""

from __future__ import annotations

import bisect
from typing import Any

from selfclust import collectives as C
from selfclust.labels.bank import LabelBank
from selfclust.labels.label_pass import gather_bank
from selfclust.methods.base import Method
from selfclust.runlog import MetricsLog
from selfclust.train.batches import RankData
from selfclust.train.schedule import relabel_steps
from selfclust.train.summary import label_record


class LabelUpdates:
    def __init__(
        self,
        method: Method,
        bank: LabelBank,
        data: RankData,
        log: MetricsLog,
        first_step: int,
        steps: int,
    ) -> None:
        """Updates over the ``steps`` of the clustering phase, which starts at ``first_step``."""
        self.method, self.bank, self.data, self.log = method, bank, data, log
        m = data.cfg.method
        start = int(m.relabel_start * steps)
        schedule = relabel_steps(steps, m.relabels, m.relabel_power, start)
        self.steps = sorted({first_step + s for s in schedule})
        self.manifold_relabels = m.manifold_updates()

    def due(self, step: int, labels_step: int) -> bool:
        """A scheduled update at ``step`` that is not already in the bank."""
        return step in self.steps and labels_step != step

    def manifold_at(self, step: int) -> bool:
        """Whether the update at ``step`` is one of the last ``method.manifold_relabels``."""
        later = len(self.steps) - bisect.bisect_left(self.steps, step)
        return later <= self.manifold_relabels

    def run(self, model: Any, step: int, epoch: int, initial: bool) -> None:
        """One label update of every rank (collective): the first labels, or the scheduled
        update at ``step``."""
        # Marks the start of a full pass over the data (fault tests kill a worker inside it).
        self.log.log({"step": step, "epoch": epoch, "event": "label_pass_start",
                      "initial": initial})  # fmt: skip
        n = self.data.num_samples
        emb = self.method.embed(self.data.label_pass(model), n, initial)
        if initial:
            local, update = self.method.first_labels(emb, self.bank)
        else:
            manifold = self.manifold_at(step)
            local, update = self.method.update_labels(emb, self.bank, step, manifold)
        record: dict[str, Any] = {"step": step, "epoch": epoch, **update}
        new = gather_bank(
            local, emb.idx, n, group=C.WORLD, skipped=emb.skipped, fill=self.bank.labels
        )
        if emb.skipped:
            record["data_skipped"] = emb.skipped
        record["label_change"] = self.bank.assign(new)
        # DEC's stop rule: the same bank, so the same on all ranks
        record.update(self.method.after_change(record["label_change"], initial))
        self.log.log(label_record(record, new, self.bank, emb, self.data.rank))
