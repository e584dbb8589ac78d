"""Byte ranges of local files and of objects on HTTP(S) and object stores (fsspec), with retries and a cache.

Local paths are read with `os.pread` (one system call, no open-file state to share across forks). A URL
(`https://`, `s3://`, `gs://`, ... anything fsspec has a backend for) is read through fsspec's filesystem
for its protocol: `cat_file(url, start, end)`, one range request per member, never the whole object. Each
process makes its own filesystem objects (after a fork, a parent's event loop and sessions are unusable).

Transient errors (connection resets, timeouts, 5xx answers, short reads) are retried `retries` times with
exponential backoff; then the read fails with a DataFileError naming the URL and the range, which the
dataset counts as a bad file. Credentials are never passed here: each backend reads its own configuration
(AWS_* variables or ~/.aws for s3fs, gcloud's for gcsfs, ...), so they never appear in a run's config or logs.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from typing import BinaryIO

from util.errors import ConfigError, DataFileError, MissingFileError

from .decode import check_regular_file

DEFAULT_RETRIES = 3
DEFAULT_BACKOFF = 0.2  # seconds before the first retry; doubled after each
DEFAULT_CACHE_BYTES = 256 << 20  # per process (each data worker has its own)


def is_url(path: str) -> bool:
    """True for `scheme://...` paths other than file:// (read through fsspec)."""
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> str:
    """`path` without a file:// prefix."""
    return path[len("file://"):] if path.startswith("file://") else path


def filesystem(url: str):
    """fsspec's filesystem and the object path for `url`; a missing fsspec or backend is a ConfigError with the
    package to install."""
    try:
        import fsspec
        from fsspec.core import url_to_fs
    except ImportError:
        raise ConfigError(f"{url}: reading URLs needs fsspec; pip install fsspec (and the backend for the "
                          f"protocol, e.g. aiohttp for https://, s3fs for s3://, gcsfs for gs://)") from None
    protocol = url.split("://", 1)[0]
    try:
        return url_to_fs(url)
    except ImportError as exc:  # fsspec knows the protocol, its backend package is missing
        raise ConfigError(f"{url}: fsspec's {protocol}:// backend is not installed ({exc}); install it (aiohttp for "
                          f"http(s)://, s3fs for s3://, gcsfs for gs://)") from None
    except ValueError as exc:
        known = ", ".join(sorted(fsspec.available_protocols())[:12])
        raise ConfigError(f"{url}: no fsspec filesystem for {protocol}:// ({exc}); known protocols include "
                          f"{known}") from None


class ByteReader:
    """Reads byte ranges of local files and URLs; retries transient errors and keeps recent URL reads in a
    cache of at most `cache_bytes` (per process)."""

    def __init__(self, retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.retries, self.backoff, self.cache_bytes = retries, backoff, cache_bytes
        self._pid = -1
        self._fs: dict[str, tuple] = {}
        self._cache: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._cached = 0

    def __getstate__(self) -> dict:
        """Settings only: filesystems and cached bytes stay with the process that made them."""
        return {"retries": self.retries, "backoff": self.backoff, "cache_bytes": self.cache_bytes}

    def __setstate__(self, state: dict) -> None:
        """Start empty in the new process."""
        self.__init__(**state)

    def _filesystem(self, url: str):
        """(fs, path) for `url`, made once per process and protocol."""
        if self._pid != os.getpid():  # a forked child: drop what the parent made
            self._pid, self._fs = os.getpid(), {}
            self._cache.clear()
            self._cached = 0
        protocol = url.split("://", 1)[0]
        if protocol not in self._fs:
            self._fs[protocol] = filesystem(url)[0]
        fs = self._fs[protocol]
        return fs, fs._strip_protocol(url)  # http(s) keeps the whole URL

    def retrying(self, url: str, what: str, call):
        """`call()` retried with backoff on transient errors; a DataFileError naming `url` after the last try."""
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            try:
                return call()
            except (FileNotFoundError, PermissionError) as exc:  # not transient: no retry
                raise MissingFileError(f"{url}: {what}: {type(exc).__name__}: {exc}") from None
            except (DataFileError, ConfigError):
                raise
            except Exception as exc:  # noqa: BLE001 - any backend's transient error (OSError, aiohttp, botocore)
                last = exc
                if attempt < self.retries:
                    time.sleep(self.backoff * 2**attempt)
        raise DataFileError(f"{url}: {what} failed after {self.retries + 1} tries ({type(last).__name__}: {last}); "
                            f"check the server or raise --shard_retries")

    def size(self, path: str) -> int:
        """Size in bytes of a local file or an object."""
        if not is_url(path):
            local = local_path(path)
            check_regular_file(local, "shard")
            return os.path.getsize(local)
        fs, p = self._filesystem(path)
        return int(self.retrying(path, "size", lambda: fs.size(p)))

    def read(self, path: str, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of a local file or an object (one range request, retried)."""
        if not is_url(path):
            local = local_path(path)
            check_regular_file(local, "shard")
            fd = os.open(local, os.O_RDONLY)
            try:
                data = os.pread(fd, length, start)
            finally:
                os.close(fd)
            if len(data) != length:
                raise DataFileError(f"{path}: bytes {start}..{start + length} wanted, the file ends after "
                                    f"{start + len(data)}: the shard is truncated; rewrite it (python -m "
                                    f"datasets.shards write) or drop it from the shard list")
            return data
        key = (path, start, length)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        fs, p = self._filesystem(path)

        def fetch() -> bytes:
            data = fs.cat_file(p, start=start, end=start + length)
            if len(data) != length:  # a dropped connection mid-body, or a server that ignores Range
                raise OSError(f"got {len(data)} bytes of the {length} asked for")
            return data

        data = self.retrying(path, f"bytes {start}..{start + length}", fetch)
        self._remember(key, data)
        return data

    def _remember(self, key: tuple[str, int, int], data: bytes) -> None:
        """Keep `data` in the cache, dropping the least recently used entries beyond `cache_bytes`."""
        if len(data) > self.cache_bytes:
            return
        self._cache[key] = data
        self._cached += len(data)
        while self._cached > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached -= len(old)

    def open(self, path: str) -> BinaryIO:
        """A sequential reader of the whole file or object (for indexing a shard once)."""
        if not is_url(path):
            local = local_path(path)
            check_regular_file(local, "shard")
            return open(local, "rb")
        fs, p = self._filesystem(path)
        return self.retrying(path, "open", lambda: fs.open(p, "rb", block_size=1 << 20))
