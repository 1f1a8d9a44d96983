"""Object stores (``s3://`` and other remote fsspec URLs): the package a URL
needs, storage options, and a pre-flight check that the store can be reached.

Credentials and the endpoint come from where the filesystem's own library
looks: for ``s3://`` that is botocore's chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL``,
``AWS_PROFILE`` and ``~/.aws/config`` / ``~/.aws/credentials``, instance
roles), plus fsspec's configuration (``fsspec.config.conf``, its
``FSSPEC_S3_*`` variables and config files), which `use_storage_options`
adds to.  loom never copies credentials into a checkpoint.

Commits on object stores need no rename: a step is visible once its marker
is written, and each marker is one PUT (see `loom.checkpoint.store`).  Chunk
objects are written through s3fs's file objects: a chunk up to s3fs's block
size (the storage option ``default_block_size``, 50 MiB unless set; loom's
chunks aim at `TARGET_CHUNK_BYTES`, 16 MiB) is one PUT, a larger one a
multipart upload in parts of that size.
"""
from __future__ import annotations

import logging

import fsspec

log = logging.getLogger("loom.checkpoint")

#: The loom extra that installs each remote protocol's fsspec filesystem.
EXTRAS = {"s3": "s3", "s3a": "s3"}
#: The pre-flight check's limits: seconds to connect and to read, and attempts.
CHECK_CONNECT_S = 5.0
CHECK_READ_S = 10.0
CHECK_ATTEMPTS = 2


class StoreAccessError(ValueError):
    """A checkpoint store that cannot be used: its filesystem package is not
    installed, or the store cannot be reached (credentials, endpoint,
    bucket).  The message names the URL and what to change."""


def protocol(url: str) -> str:
    """The fsspec protocol of ``url`` ("file" for a plain path)."""
    proto, _ = fsspec.core.split_protocol(str(url))
    return proto or "file"


def is_remote(url: str) -> bool:
    """Whether ``url`` names a store outside this machine's filesystem and
    memory (not a path, ``file://`` or ``memory://``)."""
    return protocol(url) not in ("file", "local", "memory")


def require_backend(url: str) -> type:
    """The fsspec filesystem class of ``url``; StoreAccessError naming the
    package (and loom's extra, ``pip install 'loom-train[s3]'``) when it is
    not installed, or the protocol when fsspec does not know it."""
    proto = protocol(url)
    try:
        return fsspec.get_filesystem_class(proto)
    except ImportError as exc:
        extra = EXTRAS.get(proto)
        how = f"pip install 'loom-train[{extra}]'" if extra else f"install the package fsspec names ({exc})"
        raise StoreAccessError(f"checkpoint store {url}: {proto}:// needs a package that is not installed: "
                               f"{how}") from None
    except ValueError:
        raise StoreAccessError(f"checkpoint store {url}: fsspec knows no protocol {proto!r} "
                               f"(known: {', '.join(sorted(fsspec.available_protocols())[:12])}, ...)") from None


def use_storage_options(url: str, options: dict | None) -> None:
    """Make ``options`` (fsspec storage options, e.g. ``{"endpoint_url":
    ..., "default_block_size": 64 << 20}`` for s3fs) the defaults of every
    filesystem of ``url``'s protocol this process opens from now on (fsspec's
    process-wide ``fsspec.config.conf``; options given there before are kept
    unless named again).  Nothing happens for empty ``options``.  Raises
    TypeError for options that are not a dict with str keys."""
    if not options:
        return
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise TypeError(f"storage options {options!r} must be a dict with str keys")
    cls = require_backend(url)
    protos = cls.protocol if isinstance(cls.protocol, (tuple, list)) else (cls.protocol,)
    for proto in protos:  # s3fs is "s3" and "s3a": apply_config looks under each
        fsspec.config.conf.setdefault(proto, {}).update(options)
    cls.clear_instance_cache()  # a filesystem made before would keep the old options


def storage_env(url: str) -> dict[str, str]:
    """fsspec's configuration of ``url``'s protocol in this process, as the
    environment variables (``FSSPEC_S3={...json...}``) that fsspec reads when
    another process imports it: what a child process that opens the store
    needs besides the inherited ``AWS_*`` (`use_storage_options` set it here).
    Empty when there is none; options that are not JSON are left out."""
    import json
    out = {}
    for proto in (protocol(url), *_aliases(url)):
        options = fsspec.config.conf.get(proto)
        if options:
            try:
                out[f"FSSPEC_{proto.upper()}"] = json.dumps(options)
            except (TypeError, ValueError):
                log.warning("storage options of %s:// are not JSON; a child process opens %s without them",
                            proto, url)
    return out


def _aliases(url: str) -> tuple:
    try:
        protos = fsspec.get_filesystem_class(protocol(url)).protocol
    except (ImportError, ValueError):
        return ()
    return tuple(p for p in (protos if isinstance(protos, (tuple, list)) else (protos,)) if p != protocol(url))


def check_access(url: str, options: dict | None = None) -> None:
    """Raise StoreAccessError unless the store of ``url`` can be reached
    now: its package is installed and, for ``s3://``, its bucket answers a
    HEAD with the credentials and endpoint this process would use (plus
    ``options``), within `CHECK_CONNECT_S`/`CHECK_READ_S` per attempt and
    `CHECK_ATTEMPTS` attempts.  Local and ``memory://`` URLs pass; other
    remote protocols are checked for their package only."""
    if not is_remote(url):
        return
    cls = require_backend(url)
    if protocol(url) not in ("s3", "s3a"):
        return
    _check_s3(url, cls, options or {})


def _check_s3(url: str, cls, options: dict) -> None:
    from botocore import exceptions as bx
    kwargs = fsspec.config.apply_config(cls, dict(options))
    config = dict(kwargs.get("config_kwargs") or {})
    config.update(connect_timeout=CHECK_CONNECT_S, read_timeout=CHECK_READ_S,
                  retries={"max_attempts": CHECK_ATTEMPTS, "mode": "standard"})
    kwargs.update(config_kwargs=config, skip_instance_cache=True)
    bucket = cls._strip_protocol(url).split("/", 1)[0]
    if not bucket:
        raise StoreAccessError(f"checkpoint store {url}: the URL names no bucket (s3://BUCKET/PREFIX)")
    endpoint = kwargs.get("endpoint_url") or (kwargs.get("client_kwargs") or {}).get("endpoint_url")
    fs = None
    try:
        fs = cls(**kwargs)
        fs.retries = 1  # s3fs's own retries come on top of botocore's
        fs.call_s3("head_bucket", Bucket=bucket)
    except (bx.NoCredentialsError, bx.PartialCredentialsError) as exc:
        raise StoreAccessError(
            f"checkpoint store {url}: no AWS credentials ({exc}); set AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, ~/.aws/credentials, an instance role)") from None
    except bx.ProfileNotFound as exc:
        raise StoreAccessError(f"checkpoint store {url}: {exc} (AWS_PROFILE names a profile that "
                               f"~/.aws/config does not have)") from None
    except (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError, ConnectionError) as exc:
        where = endpoint or _endpoint_of(fs)
        raise StoreAccessError(f"checkpoint store {url}: cannot reach the S3 endpoint {where} ({exc}); check "
                               f"AWS_ENDPOINT_URL or the storage option endpoint_url") from None
    except FileNotFoundError:
        raise StoreAccessError(f"checkpoint store {url}: bucket {bucket!r} does not exist at "
                               f"{endpoint or _endpoint_of(fs)}; create it first (loom makes no buckets)") \
            from None
    except PermissionError as exc:
        raise StoreAccessError(f"checkpoint store {url}: access to bucket {bucket!r} was denied ({exc}); check "
                               f"the credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)") from None
    except OSError as exc:
        raise StoreAccessError(f"checkpoint store {url}: bucket {bucket!r} cannot be used: "
                               f"{type(exc).__name__}: {exc}") from None


def _endpoint_of(fs) -> str:
    try:
        return fs.s3.meta.endpoint_url
    except Exception:  # noqa: BLE001 - only for the message
        return "(AWS's default endpoint)"
