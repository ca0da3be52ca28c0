"""Where shards live: one grammar for local paths, brace patterns, http(s) and ``pipe:`` commands.

A shard *spec* names a shard set so that every file of it is found by putting its NAME into
one template:

* ``DIR`` (or ``DIR/manifest.json``, or ``file://DIR``): a local shard directory;
* ``http(s)://HOST/PATH`` (or ``.../manifest.json``): the same layout served over HTTP;
* ``pipe:COMMAND`` with ``{name}`` where the file name goes, e.g.
  ``pipe:aws s3 cp s3://bucket/imagenet/{name} -`` (any object store through its CLI);
* ``{name}`` works in any spec (``http://h/in1k/{name}?token=...``);
* any of these with a brace pattern in place of the file name, e.g.
  ``/data/in1k/shard-{000000..001281}.tar`` or ``pipe:gsutil cat gs://b/shard-{000000..000099}.tar``
  (WebDataset's notation). The manifest is read from ``prefix + "manifest.json" + suffix`` and the
  pattern must name exactly its shards.

:func:`open_url` opens one file for streaming. No read waits forever: HTTP reads and pipe
commands are abandoned after ``timeout_s`` seconds without data, and a file that is not there
(no such path, HTTP 404/410, a command that fails before writing a byte) raises
:class:`ShardNotFound` naming it, after at most ``timeout_s`` seconds of retrying transient errors.
:func:`http_size` asks a server for a file's size without downloading it (the driver's check
that every shard is there, :mod:`selfclust.data.preflight`).
"""

from __future__ import annotations

import http.client
import io
import os
import re
import select
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import BinaryIO, cast

from webdataset.shardlists import expand_urls

from selfclust.errors import UserError

MANIFEST = "manifest.json"
DEFAULT_TIMEOUT_S = 30.0
_TOKEN = re.compile(r"[^\s/]*\{[^\s/]*")  # the file-name token holding a brace pattern
_RETRY_HTTP = frozenset({408, 429, 500, 502, 503, 504})


class ShardNotFound(UserError, FileNotFoundError):
    """A shard or manifest URL that does not exist (or cannot be reached in time)."""


@dataclass(frozen=True)
class Spec:
    """A resolved shard spec: file ``NAME`` lives at ``template`` with ``{name}`` → NAME."""

    template: str
    manifest_url: str
    names: tuple[str, ...] | None = None  # shard names a brace pattern asked for, in its order

    def url(self, name: str) -> str:
        return self.template.replace("{name}", name)

    @property
    def is_local(self) -> bool:
        return is_local(self.template)


def is_local(url: str) -> bool:
    return not url.startswith(("http://", "https://", "pipe:"))


def parse_spec(spec: str | os.PathLike) -> Spec:
    """Turn a user's shard spec into where the manifest and each shard are (see module doc)."""
    text = str(spec)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if "{name}" in text:
        return Spec(text, text.replace("{name}", MANIFEST))
    match = _TOKEN.search(text)
    if match:
        prefix, suffix = text[: match.start()], text[match.end() :]
        if "{" in prefix + suffix:
            raise ValueError(
                f"shard spec {text!r}: brace patterns may only stand for the shard file name "
                "(e.g. shards/shard-{000000..000099}.tar)"
            )
        names = tuple(expand_urls(match.group()))
        return Spec(prefix + "{name}" + suffix, prefix + MANIFEST + suffix, names)
    if text.startswith("pipe:"):
        raise ValueError(
            f"shard spec {text!r}: a pipe: command needs {{name}} where the file name goes, "
            "e.g. 'pipe:aws s3 cp s3://bucket/shards/{name} -'"
        )
    if text.endswith(".json"):  # the manifest itself: shards sit beside it
        return Spec(text[: text.rfind("/") + 1] + "{name}", text)
    prefix = text.rstrip("/") + "/"
    return Spec(prefix + "{name}", prefix + MANIFEST)


def _not_found(url: str, why: str) -> ShardNotFound:
    return ShardNotFound(f"{url} not found ({why})")


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


def _urlopen(
    url: str,
    timeout_s: float,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    refused: frozenset[int] = frozenset(),
) -> http.client.HTTPResponse:
    """``method`` on ``url``, retrying transient errors for up to ``timeout_s`` seconds; an
    HTTP status in ``refused`` is raised as the HTTPError it is, any other as ShardNotFound."""
    deadline, delay, last = _Deadline(timeout_s), 0.25, ""
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    while True:
        try:
            # The timeout bounds the connect and every later read of the response.
            timeout = max(1.0, min(timeout_s, deadline.left()))
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code in refused:
                raise
            if e.code not in _RETRY_HTTP:
                raise _not_found(url, f"HTTP {e.code} {e.reason}") from e
            last = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, OSError) as e:
            last = str(getattr(e, "reason", e))
        if deadline.left() <= delay:
            raise _not_found(url, f"unreachable for {timeout_s:.0f} s: {last}")
        time.sleep(delay)
        delay = min(2 * delay, 4.0)


def _open_http(url: str, timeout_s: float) -> BinaryIO:
    return cast(BinaryIO, _urlopen(url, timeout_s))


def _length(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def http_size(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> int | None:
    """The size in bytes of the file at an http(s) ``url``, without downloading it.

    A HEAD request's Content-Length; where HEAD is refused (405, 501) or gives no length, a GET
    of its first byte (``Range: bytes=0-0``) and the total of its Content-Range (or the
    Content-Length of a server that ignores ranges). None when the server tells neither. A
    file that is not there raises :class:`ShardNotFound` as :func:`open_url` does; both
    requests together take at most about ``timeout_s`` seconds.
    """
    deadline = _Deadline(timeout_s)
    try:
        with _urlopen(url, timeout_s, "HEAD", refused=frozenset({405, 501})) as r:
            size = _length(r.headers.get("Content-Length"))
        if size is not None:
            return size
    except urllib.error.HTTPError:
        pass  # HEAD refused: ask for one byte instead
    with _urlopen(url, max(1.0, deadline.left()), headers={"Range": "bytes=0-0"}) as r:
        if r.status == 206:  # Content-Range: bytes 0-0/TOTAL (TOTAL may be "*": unknown)
            return _length(r.headers.get("Content-Range", "").rpartition("/")[2])
        return _length(r.headers.get("Content-Length"))  # the whole file (no ranges here)


class _PipeStream(io.RawIOBase):
    """stdout of a shell command; a stall longer than ``timeout_s`` kills it, a failing exit
    status raises at the end of the data (so a truncated download is never taken as whole)."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url, self.timeout_s, self.seen = url, timeout_s, 0
        self.stderr = tempfile.TemporaryFile()
        # Its own process group, so that every process of a pipeline is killed with it.
        self.proc = subprocess.Popen(
            url[len("pipe:") :],
            shell=True,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()

    def readable(self) -> bool:
        return True

    def _kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the whole group has already exited
            pass

    def _fail(self, why: str) -> OSError:
        self.stderr.seek(0)
        tail = self.stderr.read()[-500:].decode("utf-8", "replace").strip()
        detail = f"{why}{': ' + tail if tail else ''}"
        return _not_found(self.url, detail) if self.seen == 0 else OSError(f"{self.url}: {detail}")

    def readinto(self, buf) -> int:  # type: ignore[override]
        ready, _, _ = select.select([self.fd], [], [], self.timeout_s)
        if not ready:
            self._kill()
            raise self._fail(f"no data for {self.timeout_s:.0f} s, command killed")
        n = os.readv(self.fd, [buf])
        self.seen += n
        if n == 0:
            try:
                code = self.proc.wait(timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                self._kill()
                code = -9
            if code != 0:
                raise self._fail(f"command exited with status {code}")
        return n

    def close(self) -> None:
        if not self.closed:
            if self.proc.poll() is None:
                self._kill()
            self.proc.wait()
            assert self.proc.stdout is not None
            self.proc.stdout.close()
            self.stderr.close()
        super().close()


def open_url(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> BinaryIO:
    """Open a local path, http(s) URL or ``pipe:`` command as a binary stream."""
    if url.startswith(("http://", "https://")):
        return _open_http(url, timeout_s)
    if url.startswith("pipe:"):
        return io.BufferedReader(_PipeStream(url, timeout_s), 1 << 20)  # type: ignore[return-value]
    try:
        return open(url, "rb")
    except FileNotFoundError as e:
        raise _not_found(url, "no such file") from e


def read_url(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bytes:
    """The whole content of ``url`` (small files: manifests)."""
    with open_url(url, timeout_s) as f:
        return f.read()
