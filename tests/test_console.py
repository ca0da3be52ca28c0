"""selfclust.console: rank 0's progress events and how the driver shows them (a tqdm bar on a
terminal, occasional plain lines elsewhere)."""

from __future__ import annotations

import fcntl
import io
import os
import struct
import termios

from selfclust.console import MARKER, Console, event_line, labels_text, parse_event
from selfclust.runlog import Progress

TOTAL, EPOCHS = 224, 8


def steps(every: int = 5, total: int = TOTAL) -> list[dict]:
    return [
        {"kind": "step", "step": s, "total": total, "epoch": s // 28, "epochs": EPOCHS,
         "loss": 2.5 - s / 1000, "ips": 1234.5}
        for s in range(every, total + 1, every)
    ]  # fmt: skip


LABELS = {"kind": "labels", "step": 52, "epoch": 1, "epochs": EPOCHS, "initial": False,
          "event": "relabel", "seconds": 3.14, "sinkhorn_iters": 12,
          "cluster_size_min": 54, "cluster_size_max": 471}  # fmt: skip


def test_events_survive_rays_prefix_and_reject_other_lines() -> None:
    line = event_line(LABELS)
    assert line.startswith(MARKER)
    assert parse_event(f"\x1b[36m(RayTrainWorker pid=6179)\x1b[0m {line}") == LABELS
    assert parse_event("(RayTrainWorker pid=6179) Setting up process group for: env://") is None
    assert parse_event(MARKER + '{"kind": "step", "step"') is None  # cut off
    assert parse_event(MARKER + '["kind"]') is None


def test_progress_emits_what_the_console_reads(caplog) -> None:
    """Rank 0's Progress writes the events as records of the selfclust logger; other ranks
    write nothing."""
    caplog.set_level("INFO", logger="selfclust")
    record = {"step": 52, "epoch": 1, "event": "relabel", "sinkhorn_iters": 12,
              "sinkhorn_error": 1e-4, "cluster_size_min": 54, "cluster_size_max": 471,
              "label_seconds": 3.14, "label_change": 0.2}  # fmt: skip
    Progress(TOTAL, EPOCHS, enabled=False).labels(record, initial=False)
    assert not caplog.records
    p = Progress(TOTAL, EPOCHS, enabled=True)
    p.labels(record, initial=False)
    p.step(55, 1, 2.25, 1234.5)
    events = [parse_event(r.getMessage()) for r in caplog.records]
    assert events[0] == LABELS
    assert events[1] == {"kind": "step", "step": 55, "total": TOTAL, "epoch": 1,
                         "epochs": EPOCHS, "loss": 2.25, "ips": 1234.5}  # fmt: skip


def test_label_update_line() -> None:
    text = labels_text(LABELS)
    assert text == (
        "[selfclust] labels at step 52 (epoch 2/8): 3.1 s, Sinkhorn 12 iterations, "
        "clusters of 54-471 samples"
    )
    first = {"kind": "labels", "step": 0, "epoch": 0, "epochs": 8, "initial": True,
             "event": "init_kmeans_pixels", "seconds": 0.26, "cluster_size_min": 81,
             "cluster_size_max": 282}  # fmt: skip
    assert labels_text(first) == (
        "[selfclust] first labels (kmeans_pixels) at step 0 (epoch 1/8): 0.3 s, "
        "clusters of 81-282 samples"
    )


def test_off_a_terminal_a_plain_line_now_and_then() -> None:
    out = io.StringIO()
    console = Console(out)
    assert console.mode == "lines"
    for e in steps():
        console.show(e)
        if e["step"] == 50:
            console.show(LABELS)
    console.close()
    console.show(steps()[0])  # after close: dropped
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    # 44 events: one line at each tenth of the run (22 steps), and the label update
    step_lines = [x for x in lines if x.startswith("[selfclust] step ")]
    assert 9 <= len(step_lines) <= 11, lines
    assert step_lines[0] == "[selfclust] step 5/224 epoch 1/8 loss 2.4950 1,234 img/s ETA ?"
    assert step_lines[-1].startswith("[selfclust] step 220/224 epoch 8/8 loss 2.2800")
    assert lines.count(labels_text(LABELS)) == 1
    assert all("ETA" in x for x in step_lines)


def test_verbose_a_line_per_event() -> None:
    out = io.StringIO()
    console = Console(out, mode="all")
    for e in steps():
        console.show(e)
    assert len(out.getvalue().splitlines()) == len(steps())


def test_on_a_terminal_a_tqdm_bar_with_step_epoch_loss_rate_and_eta() -> None:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    with os.fdopen(slave, "w") as tty:
        console = Console(tty)
        assert console.mode == "bar"
        for e in steps(total=56):
            console.show(e)
            if e["step"] == 25:
                console.show(LABELS)
        console.close()
    chunks = []
    while True:  # all of it: the terminal's side is closed, so reading ends in EIO
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    shown = b"".join(chunks).decode()
    assert "\r" in shown  # redrawn in place, not a line per update
    last = shown.rstrip().split("\r")[-1]
    assert "98%" in last and "step 55/56" in last, last
    assert "epoch 2/8" in last and "loss 2.4450" in last and "1,234 img/s" in last
    assert "<" in last  # elapsed<remaining: the ETA
    assert labels_text(LABELS) + "\r\n" in shown  # the label line, above the bar


def test_a_restart_starts_the_count_again() -> None:
    out = io.StringIO()
    console = Console(out, mode="lines")
    for e in steps()[:20]:  # to step 100
        console.show(e)
    console.show({"kind": "resumed", "step": 75, "epoch": 2, "epochs": EPOCHS, "workers": 2})
    console.show(steps()[14])  # step 75 again, after the restart
    lines = out.getvalue().splitlines()
    assert lines[-2] == (
        "[selfclust] resumed from the checkpoint at step 75 (epoch 3/8) on 2 workers"
    )
    assert lines[-1].startswith("[selfclust] step 75/224 epoch 3/8") and lines[-1].endswith("?")
