"""Local paths and URIs (s3://, gs://, file://) through pyarrow filesystems, with atomic writes."""
from __future__ import annotations

import json
import os
import posixpath
import tempfile
import uuid
from typing import Any

import pyarrow.fs as pafs


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


def write_bytes(path: str, data: bytes) -> None:
    """Write to a temporary sibling, then move over the target: readers never see half a file."""
    fs, p = resolve(path)
    fs.create_dir(posixpath.dirname(p) if is_uri(path) else os.path.dirname(p), recursive=True)
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, p)
    except BaseException:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)
        raise


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def local_folder(path: str) -> str:
    """``path`` itself when local, else a copy of the remote folder in a new temporary local folder."""
    if not is_uri(path):
        return path
    local = tempfile.mkdtemp(prefix="resnet_ray-")
    fs, src = resolve(path)
    for info in fs.get_file_info(pafs.FileSelector(src, recursive=True)):
        if info.type == pafs.FileType.File:
            target = os.path.join(local, os.path.relpath(info.path, src))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with fs.open_input_stream(info.path) as f, open(target, "wb") as out:
                out.write(f.read())
    return local


def upload_dir(local: str, path: str) -> None:
    """Copy the files of the local folder ``local`` into ``path`` (local path or URI), each written atomically."""
    for root, _, files in os.walk(local):
        for name in files:
            source = os.path.join(root, name)
            with open(source, "rb") as f:
                write_bytes(join(path, *os.path.relpath(source, local).split(os.sep)), f.read())
