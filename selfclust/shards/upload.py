"""The writer's ``post`` command: upload each finished shard while the next ones are written."""

from __future__ import annotations

import shlex
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path


class UploadError(OSError):
    """A ``post`` command failed; the manifest was not uploaded."""


class Uploader:
    """Runs ``command`` (with ``{path}`` and ``{name}`` filled in) for each submitted file, a
    few at a time in the background; ``wait`` raises the first failure."""

    def __init__(self, command: str, keep_local: bool = True, parallel: int = 4) -> None:
        self.command, self.keep_local = command, keep_local
        self.pool = ThreadPoolExecutor(parallel, thread_name_prefix="selfclust-post")
        self.futures: list[Future] = []

    def _run(self, path: Path, keep: bool) -> None:
        cmd = self.command.replace("{path}", shlex.quote(str(path))).replace("{name}", path.name)
        r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip()[-500:]
            raise UploadError(
                f"post command for {path.name} failed (exit {r.returncode}): {cmd}: {tail}"
            )
        if not keep:
            path.unlink()

    def submit(self, path: Path, keep: bool | None = None) -> None:
        self.futures.append(
            self.pool.submit(self._run, path, self.keep_local if keep is None else keep)
        )

    def wait(self) -> None:
        try:
            for f in self.futures:
                f.result()
        finally:
            self.futures.clear()

    def cancel(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
