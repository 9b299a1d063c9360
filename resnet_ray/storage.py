"""Local paths and URIs (s3://, gs://, file://) through pyarrow filesystems, with atomic writes and locks.

S3-compatible stores other than AWS are reached through the standard ``AWS_ENDPOINT_URL`` variable (read by
pyarrow >= 15, in every process that opens a filesystem, Ray workers included).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Optional

import pyarrow.fs as pafs

log = logging.getLogger(__name__)


def is_uri(path: str) -> bool:
    return "://" in path


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path (``~`` expanded, made absolute) or a URI."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def normalize(path: str) -> str:
    """A location string every node understands: URIs unchanged, local paths absolute."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def display(location: str, fs_path: str) -> str:
    """``fs_path`` (a path inside the filesystem of ``location``, as from :func:`resolve`) as messages name it:
    a URI with location's scheme when location is a URI (``s3://bucket/x.png``), else the local path itself."""
    return f"{location.split('://', 1)[0]}://{fs_path}" if is_uri(location) else fs_path


def join(base: str, *parts: str) -> str:
    if is_uri(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest, *parts)
    return os.path.join(normalize(base), *parts)


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def _write_atomically(path: str, write: Callable[[Any], None]) -> None:
    """``write(stream)`` into a temporary sibling of ``path``, then move it over the target: readers never see
    half a file, and a failed write leaves nothing."""
    fs, p = resolve(path)
    fs.create_dir(posixpath.dirname(p) if is_uri(path) else os.path.dirname(p), recursive=True)
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(tmp) as f:
            write(f)
        fs.move(tmp, p)
    except BaseException:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)
        raise


@contextlib.contextmanager
def new_local_folder(out_dir: str) -> Iterator[str]:
    """A temporary folder beside the local ``out_dir`` to write into, renamed to ``out_dir`` (replacing an older
    one) when the block ends without error and removed when it fails: nobody sees a half-written folder."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".new-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # a folder like any other (mkdtemp's 0700 would hide it from other users)
    try:
        yield tmp
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes(path: str, data: bytes) -> None:
    _write_atomically(path, lambda f: f.write(data))


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def split(path: str) -> tuple[str, str]:
    """(parent, last name) of a local path or URI, trailing slashes ignored."""
    location = normalize(path).rstrip("/")
    return tuple(location.rsplit("/", 1)) if is_uri(location) else os.path.split(location)


def delete_dir(path: str) -> None:
    """Delete a folder (local or URI) and everything in it; a missing folder is fine."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.NotFound:
        fs.delete_dir(p)


def list_names(path: str) -> list[str]:
    """Names of the entries directly in a folder (local or URI); [] when it does not exist."""
    fs, p = resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def stream_sha256(fs: pafs.FileSystem, path: str):
    """The hashlib SHA-256 object of the file ``path`` inside ``fs``, streamed (never held whole)."""
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest


def file_sha256(path: str) -> str:
    """Hex SHA-256 of the file ``path`` (local or URI)."""
    return stream_sha256(*resolve(path)).hexdigest()


def download(path: str, target: str) -> str:
    """Stream the file ``path`` (local or URI) to the local file ``target``; returns its SHA-256."""
    fs, p = resolve(path)
    digest = hashlib.sha256()
    with fs.open_input_stream(p) as src, open(target, "wb") as out:
        for chunk in iter(lambda: src.read(1 << 22), b""):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def local_file(path: str, suffix: str = "") -> Iterator[str]:
    """A local path holding the file ``path``: itself when local, else a temporary copy deleted afterwards."""
    if not is_uri(path):
        yield normalize(path)
        return
    fd, tmp = tempfile.mkstemp(suffix=suffix, prefix="resnet_ray-")
    os.close(fd)
    try:
        download(path, tmp)
        yield tmp
    finally:
        os.unlink(tmp)


def upload_file(local: str, path: str) -> None:
    """Stream the local file ``local`` to ``path`` (local path or URI) atomically, never holding it in memory."""

    def copy(out):
        with open(local, "rb") as src:
            for chunk in iter(lambda: src.read(1 << 22), b""):
                out.write(chunk)

    _write_atomically(path, copy)


def upload_dir(local: str, path: str) -> None:
    """Copy the files of the local folder ``local`` into ``path`` (local path or URI), each written atomically."""
    for root, _, files in os.walk(local):
        for name in files:
            source = os.path.join(root, name)
            with open(source, "rb") as f:
                write_bytes(join(path, *os.path.relpath(source, local).split(os.sep)), f.read())


# ---------------------------------------------------------------------------
# locks

LOCK_TTL_S = 60.0  # an object lock not renewed for this long belongs to a dead process
LOCK_POLL_S = 1.0
LOCK_SETTLE_S = 0.5  # an object lock is read back after this long: of two simultaneous writers the last one wins


class LockTimeout(TimeoutError):
    """Another process held a lock for longer than the caller was willing to wait."""


def _owner(token: str, ttl_s: float) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": token, "expires": time.time() + ttl_s}


@contextlib.contextmanager
def lock(path: str, wait_s: float = 1800.0, ttl_s: float = LOCK_TTL_S) -> Iterator[None]:
    """Hold the exclusive lock named ``path`` (local path or URI) while the block runs.

    Local paths: an ``flock`` on the file ``path``, which the kernel releases when the holder dies.
    URIs: object stores offer no exclusive create through pyarrow, so the lock is an object holding an owner
    token and an expiry that a heartbeat thread renews every ttl/3; an expired lock belonged to a dead process
    and is taken over. Waits at most ``wait_s`` seconds, then raises :class:`LockTimeout` naming the holder.
    """
    manager = _object_lock(path, wait_s, ttl_s) if is_uri(path) else _file_lock(normalize(path), wait_s)
    with manager:
        yield


def _who(holder: Optional[dict]) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "another process"


def _log_wait(path: str, holder: Optional[dict], deadline: float, wait_s: float) -> None:
    """Say once (on the first poll) who holds the lock and for how long we wait."""
    if deadline - time.monotonic() >= wait_s - LOCK_POLL_S:
        log.info("%s: held by %s; waiting up to %.0f s", path, _who(holder), wait_s)


def _timeout(path: str, holder: Optional[dict], wait_s: float) -> LockTimeout:
    return LockTimeout(
        f"{path}: still locked by {_who(holder)} after {wait_s:.0f} s; if that process is gone, delete {path} and retry"
    )


@contextlib.contextmanager
def _file_lock(path: str, wait_s: float) -> Iterator[None]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise _timeout(path, _read_owner(path), wait_s) from None
                _log_wait(path, _read_owner(path), deadline, wait_s)
                time.sleep(LOCK_POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_owner(uuid.uuid4().hex, 0)).encode(), 0)  # for the timeout message of others
        yield
    finally:
        os.close(fd)  # releases the flock; the file stays (deleting it would race with waiters)


def _read_owner(path: str) -> Optional[dict]:
    """The lock's owner record, or None when there is none (or it is unreadable, which counts as expired)."""
    try:
        owner = read_json(path)
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _try_take(path: str, token: str, ttl_s: float) -> tuple[bool, Optional[dict]]:
    """(taken, current holder): write our owner record unless a live one is there, then check we won."""
    holder = _read_owner(path)
    if holder and holder.get("expires", 0) > time.time():
        return False, holder
    if holder:
        log.warning("%s: taking over the expired lock of %s", path, _who(holder))
    write_text(path, json.dumps(_owner(token, ttl_s)))
    time.sleep(LOCK_SETTLE_S)
    holder = _read_owner(path)
    return bool(holder and holder.get("token") == token), holder


def _renew(path: str, token: str, ttl_s: float, stop: threading.Event) -> None:
    while not stop.wait(ttl_s / 3):
        if (_read_owner(path) or {}).get("token") != token:
            log.error("%s: lost the lock to another process", path)
            return
        write_text(path, json.dumps(_owner(token, ttl_s)))


@contextlib.contextmanager
def _object_lock(path: str, wait_s: float, ttl_s: float) -> Iterator[None]:
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    while True:
        taken, holder = _try_take(path, token, ttl_s)
        if taken:
            break
        if time.monotonic() > deadline:
            raise _timeout(path, holder, wait_s)
        _log_wait(path, holder, deadline, wait_s)
        time.sleep(LOCK_POLL_S)
    stop = threading.Event()
    heartbeat = threading.Thread(target=_renew, args=(path, token, ttl_s, stop), daemon=True)
    heartbeat.start()
    try:
        yield
    finally:
        stop.set()
        heartbeat.join()
        if (_read_owner(path) or {}).get("token") == token:
            fs, p = resolve(path)
            fs.delete_file(p)
