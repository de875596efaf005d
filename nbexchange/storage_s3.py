"""The archive store on an S3-compatible object store: each blob an object named by its sha256."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from nbexchange.errors import NotFound, Unavailable
from nbexchange.storage import CHUNK_SIZE, ArchiveStore, BlobReader, check_digest, is_digest, make_dirs, older_than

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = logging.getLogger(__name__)

#: Seconds to wait for the object store to accept a connection, and for each read of an answer.
CONNECT_TIMEOUT = 5
READ_TIMEOUT = 60
#: Attempts per request (botocore's "standard" retry mode: transient errors, with backoff).
ATTEMPTS = 3
#: Archives larger than this go up as a multipart upload, in parts of this size (S3's minimum part is 5 MiB).
MULTIPART_SIZE = 16 * 1024 * 1024
#: Parts of one multipart upload sent at once.
MULTIPART_CONCURRENCY = 4
#: Connections kept to the object store, shared by the process's threads.
MAX_CONNECTIONS = 32

#: Under the prefix: the blobs, the marks of blobs stored again, and blobs the collector set aside.
BLOBS = "archives/"
STORED_AGAIN = "stored-again/"
COLLECTING = "collecting/"

#: Object times are whole seconds (the listing's, and HTTP dates): a mark may have been written up to this much
#: after the time it shows, and counts as that late, so that it keeps its blob whichever way the second falls.
TIME_RESOLUTION = 1.0

_NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound"})
_PRECONDITION = frozenset({"412", "PreconditionFailed"})


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def _translated(what: str, missing: str | None = None) -> Iterator[None]:
    """The object store's errors as the exchange's: a missing object is NotFound (``missing`` its note), any
    other failure Unavailable."""
    try:
        yield
    except ClientError as e:
        if _code(e) in _NOT_FOUND:
            raise NotFound(missing or f"The archive store has no {what}.") from e
        log.error("The archive store refused to %s: %s", what, e)
        note = f"The archive store refused a request ({_code(e)}); nothing was stored. Try again later."
        raise Unavailable(note) from e
    except (BotoCoreError, Boto3Error) as e:
        log.error("The archive store is unreachable (%s): %s", what, e)
        raise Unavailable("The archive store is unreachable; nothing was stored. Try again later.") from e


class S3ArchiveStore(ArchiveStore):
    """Blobs as objects ``<prefix>archives/<sha256>`` of one bucket; uploads arrive in ``tmp`` on local disk.

    Credentials come from the AWS SDK's usual chain (``AWS_ACCESS_KEY_ID``
    and ``AWS_SECRET_ACCESS_KEY``, a profile, an instance or pod role).
    An object is durable once ``PutObject`` (or ``CompleteMultipartUpload``)
    has answered, which ``finish`` waits for before any event may name it.

    Storing bytes already stored is the race the local store settles with a
    rename; here, with what every S3-compatible store offers:

    - An upload that finds its blob stored writes a mark
      ``<prefix>stored-again/<sha256>/<uuid>`` (an empty object, its own
      key), then looks again: still there, it relies on it; gone, it
      uploads its own copy.
    - The collector copies a candidate aside (``<prefix>collecting/…``),
      only if it was not modified since the cutoff (a copy stored anew
      meanwhile is young), deletes it, then looks for marks younger than
      the cutoff: finding one, it copies the blob back.

    Each side writes before it reads what the other writes, and S3 reads
    are strongly consistent: either the upload's second look finds the
    blob gone (and it uploads its own copy), or the collector's look finds
    the mark (and it puts the blob back). Between the collector's delete
    and its copy back (a few requests) the blob is absent; the local store
    has the same moment between its two renames.

    Object times are the object store's clock and the cutoff this host's:
    their skew must stay far below ``blob_grace``.
    """

    sync_temp = False  # the temp file is sent away, not kept: its bytes need not reach this disk

    def __init__(
        self,
        *,
        bucket: str,
        tmp: Path,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing_style: str = "auto",
        create: bool = True,
        create_bucket: bool = False,
    ) -> None:
        self.bucket = bucket
        #: Unfinished multipart uploads this process has listed, and when it first did (remove_leftovers).
        self._unfinished_seen: dict[str, float] = {}
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.tmp = Path(tmp)
        config = Config(
            region_name=region or None,
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            retries={"mode": "standard", "max_attempts": ATTEMPTS},
            max_pool_connections=MAX_CONNECTIONS,
            s3={"addressing_style": addressing_style},
        )
        # A session of its own: boto3's default session is not safe to share between threads.
        self.client: Any = boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config)
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_SIZE,
            multipart_chunksize=MULTIPART_SIZE,
            max_concurrency=MULTIPART_CONCURRENCY,
        )
        if create:  # an auditor's read creates nothing
            make_dirs(self.tmp)
            if create_bucket:
                self._create_bucket()

    def __repr__(self) -> str:
        return f"S3ArchiveStore(bucket={self.bucket!r}, prefix={self.prefix!r})"

    def _create_bucket(self) -> None:
        with _translated(f"bucket {self.bucket}"):
            try:
                self.client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as e:
                if _code(e) not in _NOT_FOUND and _code(e) != "NoSuchBucket":
                    raise
            region = self.client.meta.region_name
            where = {"CreateBucketConfiguration": {"LocationConstraint": region}}
            with contextlib.suppress(self.client.exceptions.BucketAlreadyOwnedByYou):
                self.client.create_bucket(Bucket=self.bucket, **({} if region in (None, "us-east-1") else where))

    def _key(self, sha256: str) -> str:
        check_digest(sha256)
        return self.prefix + BLOBS + sha256

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            with _translated(f"object {key}"):
                answer: dict[str, Any] = self.client.head_object(Bucket=self.bucket, Key=key)
                return answer
        except NotFound:
            return None

    def exists(self, sha256: str) -> bool:
        if not is_digest(sha256):
            return False
        return self._head(self._key(sha256)) is not None

    def open(self, sha256: str) -> BlobReader:
        key = self._key(sha256)
        with _translated(f"download of {key}", f"No archive with sha256 {sha256} is stored."):
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
        return BlobReader(_ObjectBody(answer["Body"]), int(answer["ContentLength"]))

    def _keep(self, temp: Path, sha256: str) -> None:
        key = self._key(sha256)
        if self._head(key) is not None:
            # Stored already: mark it stored again, then look again (see the class's docstring).
            mark = f"{self.prefix}{STORED_AGAIN}{sha256}/{uuid.uuid4().hex}"
            with _translated(f"mark {mark}"):
                self.client.put_object(Bucket=self.bucket, Key=mark, Body=b"")
            if self._head(key) is not None:
                temp.unlink()
                return
        with _translated(f"upload of {key}"):
            self.client.upload_file(str(temp), self.bucket, key, Config=self.transfer)
        temp.unlink()

    def _objects(self, prefix: str) -> Iterator[dict[str, Any]]:
        """Every object under ``prefix`` (``Key``, ``LastModified``…), a page of ListObjectsV2 at a time."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        with _translated(f"listing of {prefix}"):
            for page in pages:
                yield from page.get("Contents", ())

    def _marks(self, sha256: str | None = None) -> Iterator[tuple[str, float]]:
        """The stored-again marks (of one blob, or of all): (sha256, the latest time it may have been written)."""
        under = f"{self.prefix}{STORED_AGAIN}"
        for obj in self._objects(under + (f"{sha256}/" if sha256 else "")):
            yield obj["Key"][len(under) :].split("/", 1)[0], obj["LastModified"].timestamp() + TIME_RESOLUTION

    def _marked_after(self, sha256: str, cutoff: float) -> bool:
        return any(marked > cutoff for _, marked in self._marks(sha256))

    def blobs(self) -> Iterator[tuple[str, float]]:
        again: dict[str, float] = {}
        for sha256, marked in self._marks():
            again[sha256] = max(again.get(sha256, 0.0), marked)
        under = self.prefix + BLOBS
        for obj in self._objects(under):
            sha256 = obj["Key"][len(under) :]
            if is_digest(sha256):
                yield sha256, max(obj["LastModified"].timestamp(), again.get(sha256, 0.0))

    def collect(self, sha256: str, cutoff: float) -> bool:
        key = self._key(sha256)
        if self._marked_after(sha256, cutoff):
            return False
        aside = f"{self.prefix}{COLLECTING}{sha256}/{uuid.uuid4().hex}"
        # Object times are whole seconds: the candidate's (listed before the cutoff) is at most the cutoff's.
        unmodified_since = datetime.fromtimestamp(math.floor(cutoff), UTC)
        try:
            with _translated(f"archive with sha256 {sha256}"):
                # boto3's managed copy: past MULTIPART_SIZE, in parts (one CopyObject stops at 5 GiB).
                self.client.copy(
                    {"Bucket": self.bucket, "Key": key},
                    self.bucket,
                    aside,
                    ExtraArgs={"CopySourceIfUnmodifiedSince": unmodified_since},
                    Config=self.transfer,
                )
        except NotFound:
            return False  # collected meanwhile
        except Unavailable as e:
            if isinstance(e.__cause__, ClientError) and _code(e.__cause__) in _PRECONDITION:
                return False  # stored anew after the cutoff
            raise
        with _translated(f"removal of {key}"):
            self.client.delete_object(Bucket=self.bucket, Key=key)
            if self._marked_after(sha256, cutoff):
                # Stored again meanwhile: same bytes, put back.
                self.client.copy({"Bucket": self.bucket, "Key": aside}, self.bucket, key, Config=self.transfer)
                self.client.delete_object(Bucket=self.bucket, Key=aside)
                return False
            self.client.delete_object(Bucket=self.bucket, Key=aside)
        return True

    def remove_leftovers(self, cutoff: float) -> list[str]:
        """Partial uploads in ``tmp``, and in the bucket: unfinished multipart uploads, old marks, blobs set aside.

        The object store's own leftovers are named ``s3://bucket/key``.
        """
        removed = []
        for path in self.tmp.iterdir() if self.tmp.is_dir() else ():
            if older_than(path, cutoff):
                path.unlink(missing_ok=True)
                removed.append(str(path))
        for prefix in (STORED_AGAIN, COLLECTING):
            for obj in self._objects(self.prefix + prefix):
                if obj["LastModified"].timestamp() < cutoff:
                    with _translated(f"removal of {obj['Key']}"):
                        self.client.delete_object(Bucket=self.bucket, Key=obj["Key"])
                    removed.append(f"s3://{self.bucket}/{obj['Key']}")
        now = time.time()
        unfinished: dict[str, float] = {}
        with _translated("listing of multipart uploads"):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.prefix + BLOBS
            )
            for page in pages:
                for upload in page.get("Uploads", ()):
                    upload_id = upload["UploadId"]
                    first_seen = self._unfinished_seen.get(upload_id, now)
                    # Abandoned only when the store says it began before the cutoff *and* this process saw it
                    # unfinished before then: the store's time alone is not enough (moto says every upload
                    # began in 2010; another store's clock may be off), and an upload in flight is never cut.
                    if max(upload["Initiated"].timestamp(), first_seen) < cutoff:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload_id)
                        removed.append(f"s3://{self.bucket}/{upload['Key']}?uploadId={upload_id}")
                    else:
                        unfinished[upload_id] = first_seen
        self._unfinished_seen = unfinished
        return removed


class _ObjectBody(io.RawIOBase):
    """An object's body as it streams in; the object store's failures mid-way are ``Unavailable``."""

    def __init__(self, body: Any) -> None:
        super().__init__()
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        with memoryview(buffer) as view:
            with _translated("rest of an archive"):
                chunk = self._body.read(min(len(view), CHUNK_SIZE))
            view[: len(chunk)] = chunk
            return len(chunk)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()
