"""Where a job reads and writes: a local path or an `s3://bucket/key` URI, behind four verbs.

S3 goes through boto3 (already in the runtime image for Secrets Manager). A Cloud Storage bucket
needs nothing here: Cloud Run jobs mount it as a folder (infra/cloudrun/job-*.yaml).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


Location = Path | S3Uri


def parse_location(text: str) -> Location:
    if text.startswith("s3://"):
        bucket, _, key = text[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"{text!r}: an S3 URI needs a bucket (s3://bucket/key)")
        return S3Uri(bucket, key)
    return Path(text)


def child(base: Location, name: str) -> Location:
    """`name` inside the folder or prefix `base` (an S3 prefix gains its missing slash)."""
    if isinstance(base, S3Uri):
        prefix = base.key if not base.key or base.key.endswith("/") else base.key + "/"
        return S3Uri(base.bucket, prefix + name)
    return base / name


@cache
def s3_client() -> Any:
    """One client per process. AWS_ENDPOINT_URL (boto3 reads it itself) points it at a local S3."""
    import boto3

    return boto3.client("s3")


def list_inputs(location: Location) -> list[Location]:
    """The files to read, sorted by name: the file itself, or every file in a folder / prefix
    (hidden files and names starting with `_` skipped: Spark and Hive write `_SUCCESS` there)."""
    found: list[Location]
    if isinstance(location, S3Uri):
        if location.key and not location.key.endswith("/"):
            return [location]
        paginator = s3_client().get_paginator("list_objects_v2")
        keys = [
            obj["Key"]
            for page in paginator.paginate(Bucket=location.bucket, Prefix=location.key)
            for obj in page.get("Contents", [])
        ]
        found = [S3Uri(location.bucket, k) for k in sorted(keys) if _listed(k.rsplit("/", 1)[-1])]
    elif location.is_dir():
        found = [
            p
            for p in sorted(location.rglob("*"))
            if p.is_file() and all(_listed(part) for part in p.relative_to(location).parts)
        ]
    elif location.is_file():
        return [location]
    else:
        raise FileNotFoundError(f"{location}: no such file or folder")
    if not found:
        raise FileNotFoundError(f"{location}: holds no input files")
    return found


def _listed(name: str) -> bool:
    return bool(name) and not name.startswith((".", "_"))


def fetch(location: Location, workdir: Path) -> Path:
    """A local path to read `location` from: itself, or an S3 object downloaded into workdir (the
    readers need a seekable file: Parquet reads its footer first)."""
    if isinstance(location, Path):
        return location
    target = workdir / uuid.uuid4().hex
    s3_client().download_file(location.bucket, location.key, str(target))
    return target


def exists(location: Location) -> bool:
    if isinstance(location, Path):
        return location.is_file()
    from botocore.exceptions import ClientError

    try:
        s3_client().head_object(Bucket=location.bucket, Key=location.key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
            return False
        raise
    return True


def read_bytes(location: Location) -> bytes:
    if isinstance(location, Path):
        return location.read_bytes()
    body: bytes = s3_client().get_object(Bucket=location.bucket, Key=location.key)["Body"].read()
    return body


def put_file(source: Path, location: Location) -> None:
    """Publish a finished local file at `location`, whole or not at all.

    Locally it is copied to a hidden temporary name beside the target and renamed: a crash leaves
    at most a `.tmp-*` file, never a half part under a part's name, and a re-run ignores it. On S3
    a PUT is already all-or-nothing (a reader sees the old object, none, or the new one whole).
    """
    if isinstance(location, S3Uri):
        s3_client().upload_file(str(source), location.bucket, location.key)
        return
    location.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{location.name}.", dir=location.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, location)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def display_name(location: Location, root: Location) -> str:
    """How errors name a file: relative to the input folder or prefix, else the file's name."""
    if isinstance(location, S3Uri) and isinstance(root, S3Uri):
        prefix = root.key if root.key.endswith("/") else ""
        return location.key[len(prefix) :] if prefix else location.key.rsplit("/", 1)[-1]
    if isinstance(location, Path) and isinstance(root, Path) and root.is_dir():
        return location.relative_to(root).as_posix()
    return str(location).rsplit("/", 1)[-1]
