"""The object store: where raw block payloads and Parquet partition files live.

One small API over two backends, chosen by URL in :func:`open_store`:

* a local directory (a plain path or ``file://``), the default;
* ``s3://bucket/prefix`` on any S3-compatible store through ``pyarrow.fs.S3FileSystem``
  (endpoint, region and credentials from explicit arguments, URL query parameters
  ``endpoint``/``region``/``scheme``, or the usual ``AWS_*`` environment variables).

Inside PostgreSQL the store comes from the foreign server, user mapping and table options
(:func:`store_from_options`): secrets belong in a *user mapping*, whose options only the mapped
role and superusers can read, never in server or table options that every role sees in
``pg_foreign_server`` / ``information_schema``.

Writes are create-only and atomic: a reader never sees half an object.  Locally the bytes go to a
temporary file in the target directory which is then hard-linked into place (``link`` fails if
the name exists, unlike ``rename``, so a concurrent writer never replaces an object) and
unlinked.  S3 ``PUT`` is atomic by itself.  Paths are always relative, ``/``-separated keys.

For pyarrow readers (``pyarrow.parquet``), :attr:`ObjectStore.filesystem` and
:meth:`ObjectStore.fs_path` give the filesystem and the full path of a key.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pyarrow.fs as pafs

from otelspans_fdw.exceptions import ConfigurationError, StoreError

__all__ = [
    "STORE_OPTIONS",
    "LocalStore",
    "ObjectStore",
    "S3Store",
    "default_store_url",
    "open_store",
    "store_from_options",
]

TMP_PREFIX = ".tmp-"


def default_store_url() -> str:
    """``OTELSPANS_STORE`` if set, else ``./otelspans-data``."""
    return os.environ.get("OTELSPANS_STORE", "otelspans-data")


def _check_key(path: str) -> str:
    key = path.strip("/")
    if not key or any(p in ("", ".", "..") for p in key.split("/")):
        raise StoreError(f"invalid object path {path!r}")
    return key


class ObjectStore(ABC):
    """Create-only object store addressed by relative ``/``-separated keys."""

    url: str

    @property
    @abstractmethod
    def filesystem(self) -> pafs.FileSystem:
        """The pyarrow filesystem holding the objects."""

    @property
    @abstractmethod
    def root(self) -> str:
        """The store root as a path in :attr:`filesystem` (no trailing slash)."""

    def fs_path(self, path: str) -> str:
        """Full path of ``path`` in :attr:`filesystem`, for pyarrow readers and writers."""
        return f"{self.root}/{_check_key(path)}"

    def ensure_parent(self, path: str) -> str:
        """Create the parent directory of ``path`` if the backend needs one; return fs_path.

        For pyarrow writers that stream straight into the store (local directories need their
        parents; S3 has none).  Writing bytes with :meth:`put_if_absent` is atomic and
        preferred; a streamed write is visible while being written.
        """
        return self.fs_path(path)

    @abstractmethod
    def put_if_absent(self, path: str, data: bytes) -> bool:
        """Store ``data`` at ``path`` unless an object is there; True if this call created it."""

    @abstractmethod
    def get(self, path: str) -> bytes:
        """The bytes of ``path``; :class:`StoreError` if missing."""

    @abstractmethod
    def exists(self, path: str) -> bool:
        """Whether an object is stored at ``path``."""

    @abstractmethod
    def delete(self, path: str) -> bool:
        """Remove ``path``; True if something was removed."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (a directory-like prefix), recursively, sorted."""

    def mtime(self, path: str) -> float | None:
        """Modification time (epoch seconds) of ``path``, None if missing."""
        info = self.filesystem.get_file_info(self.fs_path(path))
        if info.type == pafs.FileType.NotFound or info.mtime is None:
            return None
        return info.mtime.timestamp()

    def iceberg_properties(self) -> dict[str, str]:
        """pyiceberg FileIO properties reaching this store (the Iceberg warehouse lives here).

        Needed because pyiceberg opens the files itself: inside a PostgreSQL backend there are
        no ``AWS_*`` variables, so credentials from a user mapping must be handed over.
        """
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class LocalStore(ObjectStore):
    """A directory on the local filesystem (plain ``os`` calls for speed on the ingest path)."""

    def __init__(self, directory: str | os.PathLike[str], *, durable: bool = True):
        self.dir = Path(directory).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.url = str(self.dir)
        #: fsync file and directory before a put returns (survives an OS crash, not only ours).
        self.durable = durable
        self._fs = pafs.LocalFileSystem()

    @property
    def filesystem(self) -> pafs.FileSystem:
        return self._fs

    @property
    def root(self) -> str:
        return str(self.dir)

    def _abs(self, path: str) -> Path:
        return self.dir / _check_key(path)

    def ensure_parent(self, path: str) -> str:
        self._abs(path).parent.mkdir(parents=True, exist_ok=True)
        return self.fs_path(path)

    def put_if_absent(self, path: str, data: bytes) -> bool:
        dest = self._abs(path)
        if dest.exists():
            # Refresh the time so that an orphan-cleanup grace period never removes an object
            # that a retried request is about to reference.
            os.utime(dest)
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f"{TMP_PREFIX}{dest.name}-{secrets.token_hex(6)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, dest)
                created = True
            except FileExistsError:
                created = False
            if created and self.durable:
                dfd = os.open(dest.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            return created
        except OSError as e:
            raise StoreError(f"cannot write {path}: {e}") from e
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def get(self, path: str) -> bytes:
        try:
            return self._abs(path).read_bytes()
        except FileNotFoundError as e:
            raise StoreError(f"object {path} not found in {self.url}") from e

    def exists(self, path: str) -> bool:
        return self._abs(path).is_file()

    def delete(self, path: str) -> bool:
        try:
            self._abs(path).unlink()
            return True
        except FileNotFoundError:
            return False

    def list(self, prefix: str = "") -> list[str]:
        base = self.dir / prefix.strip("/") if prefix.strip("/") else self.dir
        out: list[str] = []
        for root, _dirs, files in os.walk(base):
            rel = os.path.relpath(root, self.dir)
            for f in files:
                out.append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
        return sorted(out)

    def mtime(self, path: str) -> float | None:
        try:
            return self._abs(path).stat().st_mtime
        except FileNotFoundError:
            return None


class S3Store(ObjectStore):
    """``s3://bucket/prefix`` on any S3-compatible service, through pyarrow's S3 filesystem."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        scheme: str | None = None,
        anonymous: bool = False,
    ):
        endpoint = (
            endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        )
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        kwargs: dict[str, object] = {}
        iceberg: dict[str, str] = {}
        if endpoint:
            parsed = urlparse(endpoint)
            if parsed.scheme:
                scheme = scheme or parsed.scheme
                endpoint = parsed.netloc + parsed.path.rstrip("/")
            kwargs["endpoint_override"] = endpoint
            iceberg["s3.endpoint"] = f"{scheme or 'https'}://{endpoint}"
        if scheme:
            kwargs["scheme"] = scheme
        if region:
            kwargs["region"] = region
            iceberg["s3.region"] = region
        access_key = access_key or os.environ.get("AWS_ACCESS_KEY_ID")
        secret_key = secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY")
        session_token = session_token or os.environ.get("AWS_SESSION_TOKEN")
        if anonymous:
            kwargs["anonymous"] = True
            iceberg["s3.anonymous"] = "true"
        elif access_key and secret_key:
            kwargs.update(access_key=access_key, secret_key=secret_key)
            iceberg.update({"s3.access-key-id": access_key, "s3.secret-access-key": secret_key})
            if session_token:
                kwargs["session_token"] = session_token
                iceberg["s3.session-token"] = session_token
        self._iceberg = iceberg
        try:
            self._fs = pafs.S3FileSystem(**kwargs)  # type: ignore[arg-type]
        except Exception as e:  # pyarrow raises several types for bad configuration
            raise ConfigurationError(f"cannot configure S3 store: {e}") from e
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")

    @property
    def filesystem(self) -> pafs.FileSystem:
        return self._fs

    @property
    def root(self) -> str:
        return f"{self.bucket}/{self.prefix}".rstrip("/")

    def iceberg_properties(self) -> dict[str, str]:
        return dict(self._iceberg)

    def put_if_absent(self, path: str, data: bytes) -> bool:
        full = self.fs_path(path)
        try:
            if self._fs.get_file_info(full).type == pafs.FileType.File:
                return False
            with self._fs.open_output_stream(full, metadata={}) as out:
                out.write(data)
            return True
        except OSError as e:
            raise StoreError(f"cannot write {self.url}/{path}: {e}") from e

    def get(self, path: str) -> bytes:
        try:
            with self._fs.open_input_stream(self.fs_path(path)) as f:
                return bytes(f.read())
        except FileNotFoundError as e:
            raise StoreError(f"object {path} not found in {self.url}") from e
        except OSError as e:
            raise StoreError(f"cannot read {self.url}/{path}: {e}") from e

    def exists(self, path: str) -> bool:
        return self._fs.get_file_info(self.fs_path(path)).type == pafs.FileType.File

    def delete(self, path: str) -> bool:
        if not self.exists(path):
            return False
        self._fs.delete_file(self.fs_path(path))
        return True

    def list(self, prefix: str = "") -> list[str]:
        base = f"{self.root}/{prefix.strip('/')}".rstrip("/")
        sel = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        n = len(self.root) + 1
        return sorted(
            i.path[n:] for i in self._fs.get_file_info(sel) if i.type == pafs.FileType.File
        )


def open_store(url: str | None = None, **options: object) -> ObjectStore:
    """Open the store at ``url`` (default :func:`default_store_url`).

    ``s3://bucket/prefix[?endpoint=http://host:port&region=r]`` gives an :class:`S3Store`
    (keyword ``options`` are passed on: endpoint, region, access_key, secret_key, ...); a path or
    ``file://`` URL gives a :class:`LocalStore` (option ``durable``).
    """
    url = url or default_store_url()
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigurationError(f"S3 store URL {url!r} has no bucket")
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        opts = {**query, **options}
        return S3Store(parsed.netloc, parsed.path, **opts)  # type: ignore[arg-type]
    if parsed.scheme == "file":
        return LocalStore(parsed.path, **options)  # type: ignore[arg-type]
    if parsed.scheme and len(parsed.scheme) > 1:
        raise ConfigurationError(
            f"unsupported object store URL {url!r}", hint="Use a path or s3://"
        )
    return LocalStore(url, **options)  # type: ignore[arg-type]


#: Options (server, user mapping, table) that configure the store, and the S3Store keyword
#: each one feeds.  ``aws_*`` names follow the AWS variables; short aliases are accepted.
STORE_OPTIONS: dict[str, str] = {
    "aws_access_key_id": "access_key",
    "aws_secret_access_key": "secret_key",
    "aws_session_token": "session_token",
    "aws_region": "region",
    "region": "region",
    "aws_endpoint_url": "endpoint",
    "endpoint": "endpoint",
}
#: ``aws_credentials`` option values: ``keys`` (default: access key id and secret from the
#: options or the AWS variables, required), ``default`` (the AWS SDK's own chain: profiles,
#: instance or pod roles) and ``anonymous`` (public buckets).
CREDENTIAL_MODES = ("keys", "default", "anonymous")

_option_stores: dict[tuple[tuple[str, str], ...], ObjectStore] = {}


def _missing_credentials(url: str) -> ConfigurationError:
    return ConfigurationError(
        f"no S3 credentials for object store {url}",
        detail="Neither the options of the foreign server and of the current role's user "
        "mapping nor the AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY variables of the server "
        "process give an access key.",
        hint="A superuser runs: CREATE USER MAPPING FOR <role> SERVER otel_spans_server "
        "OPTIONS (aws_access_key_id '...', aws_secret_access_key '...'); or set the server "
        "option aws_credentials 'default' to use the AWS SDK's credential chain.",
    )


def store_from_options(options: Mapping[str, str], *, default: str | None = None) -> ObjectStore:
    """The store named by the wrapper's merged options (server, user mapping, table).

    ``store`` (else ``default``, else :func:`default_store_url`) is the URL; for S3 the
    :data:`STORE_OPTIONS` add endpoint, region and credentials (options win over the URL
    query, which wins over the ``AWS_*`` variables).  Without any access key an S3 store is an
    error naming the fix, unless ``aws_credentials`` says otherwise: silently falling back
    to unsigned requests or instance metadata would fail later and far less clearly.  Stores
    are cached per distinct configuration, so each role keeps its own credentials.
    """
    url = options.get("store") or default or default_store_url()
    relevant = {k: v for k, v in options.items() if k in STORE_OPTIONS or k == "aws_credentials"}
    key = (("store", url), *sorted(relevant.items()))
    store = _option_stores.get(key)
    if store is not None:
        return store
    if urlparse(url).scheme != "s3":
        store = open_store(url)
    else:
        mode = relevant.get("aws_credentials", "keys").lower()
        if mode not in CREDENTIAL_MODES:
            raise ConfigurationError(
                f"invalid value for option aws_credentials: {mode!r}",
                hint="Use one of: " + ", ".join(CREDENTIAL_MODES) + ".",
            )
        kwargs: dict[str, object] = {
            STORE_OPTIONS[k]: v for k, v in relevant.items() if k in STORE_OPTIONS and v
        }
        has_key = (kwargs.get("access_key") and kwargs.get("secret_key")) or (
            os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")
        )
        if mode == "keys" and not has_key:
            raise _missing_credentials(url.split("?", 1)[0])
        if mode == "anonymous":
            kwargs["anonymous"] = True
        store = open_store(url, **kwargs)
    _option_stores[key] = store
    return store


def age_seconds(store: ObjectStore, path: str) -> float | None:
    """Seconds since ``path`` was last written (None if missing); used by orphan cleanup."""
    m = store.mtime(path)
    return None if m is None else time.time() - m


#: Server option / environment variable: files and directories the lake writes (partitions,
#: the Iceberg warehouse) are readable by every OS user, for an engine running as another one.
SHARED_FILES_OPTION = "shared_files"
SHARED_FILES_ENV = "OTELSPANS_SHARED_FILES"


def shared_files(options: Mapping[str, str] | None = None) -> bool:
    """Whether ``shared_files`` is on (server option, else the environment)."""
    value = (options or {}).get(SHARED_FILES_OPTION) or os.environ.get(SHARED_FILES_ENV, "")
    return value.strip().lower() in ("on", "true", "yes", "1")


@contextlib.contextmanager
def file_mode(shared: bool) -> Iterator[None]:
    """Write with umask 022 (files 644, directories 755) while ``shared``; else as the process
    does (PostgreSQL's backends: 077).  Only around our own writes: the server's files keep
    the server's mask."""
    if not shared:
        yield
        return
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)
