"""The job's checkpoint store as the launcher sees it: checked before any
worker starts, its storage options applied in every process that opens it,
and the AWS configuration the driver sees forwarded to Ray workers.

``--ckpt-url s3://bucket/prefix`` needs s3fs (``pip install
'loom-train[s3]'``), credentials and an endpoint from botocore's usual places
(``AWS_*`` variables, ``~/.aws`` files, instance roles) or
``--ckpt-storage-options`` (fsspec storage options), and an existing bucket;
`store_problems` finds each of these missing in a few seconds, naming the
bucket or endpoint (`loom.checkpoint.object_store.check_access`).
"""
from __future__ import annotations

import os

from loom.checkpoint import object_store
from loom.checkpoint.levels import local_dir

#: Storage option names that hold credentials (refused: the config is written to the run directory).
SECRET_OPTIONS = {"key", "secret", "token", "password", "session_token", "access_key", "secret_key",
                  "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "account_key",
                  "sas_token", "client_secret"}


def uses_store(c) -> bool:
    """Whether the job reads or writes ``--ckpt-url`` (``c``: the ``[ckpt]`` section)."""
    return bool(c.ckpt_url) and (c.ckpt_every > 0 or c.resume)


def storage_option_problems(c) -> list[str]:
    """What is wrong with ``--ckpt-storage-options`` without opening
    anything: options with no store, or credentials among them."""
    options = c.ckpt_storage_options
    if not options:
        return []
    if not c.ckpt_url:
        return [f"--ckpt-storage-options {_show(options)} configure --ckpt-url's filesystem, but no "
                f"--ckpt-url is given"]
    nested = {k for v in options.values() if isinstance(v, dict) for k in v}
    secrets = sorted(k for k in set(options) | nested if k.lower() in SECRET_OPTIONS)
    if secrets:
        return [f"--ckpt-storage-options: {', '.join(secrets)} would be written to the run directory's "
                f"config.toml; give credentials through the environment instead (AWS_ACCESS_KEY_ID, "
                f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials for s3://), which reaches the "
                f"workers without being written down"]
    return []


def local_level_problems(c) -> list[str]:
    """What is wrong with ``--ckpt-local`` (the node-local checkpoint
    level): it needs ``--ckpt-url`` and ``--ckpt-every``, must be a local
    directory (not a URL) and not the ``--ckpt-url`` store itself."""
    problems = []
    for name in ("keep_last_local", "ckpt_pending_copies"):
        if getattr(c, name) < 1:
            problems.append(f"--{name.replace('_', '-')}={getattr(c, name)} must be >= 1")
    if not c.ckpt_local:
        return problems
    if not c.ckpt_url or not c.ckpt_every > 0:
        problems.append(f"--ckpt-local={c.ckpt_local} is a level in front of --ckpt-url: it needs --ckpt-url "
                        f"(an object store or shared filesystem) and --ckpt-every")
    try:
        local = local_dir(c.ckpt_local)
    except ValueError as exc:
        return problems + [f"--ckpt-local: {exc}"]
    url = c.ckpt_url[len("file://"):] if c.ckpt_url.startswith("file://") else c.ckpt_url
    if c.ckpt_url and "://" not in url and os.path.abspath(url) == local:
        problems.append(f"--ckpt-local={c.ckpt_local} is --ckpt-url itself: the local level must be a "
                        f"node-local directory of its own, --ckpt-url the store every node reaches")
    return problems


def store_problems(c) -> list[str]:
    """Whether the job's checkpoint store can be used from here: its
    filesystem package is installed and (``s3://``) its bucket answers with
    the credentials and endpoint this process has, in bounded time.  Only
    for a job that saves or resumes."""
    if not uses_store(c):
        return []
    try:
        object_store.check_access(c.ckpt_url, c.ckpt_storage_options)
    except object_store.StoreAccessError as exc:
        return [f"--ckpt-url: {exc}"]
    return []


def apply_storage_options(c) -> None:
    """Make ``--ckpt-storage-options`` the defaults of this process's
    filesystems of ``--ckpt-url``'s protocol (before the store is opened
    here: the driver and every worker call this)."""
    if c.ckpt_url and c.ckpt_storage_options:
        object_store.use_storage_options(c.ckpt_url, c.ckpt_storage_options)


def worker_env(cfg, environ=None) -> dict[str, str]:
    """The ``AWS_*`` variables of ``environ`` (default ``os.environ``) when
    the job (a JobConfig) reads or writes ``s3://``: its checkpoint store,
    ``--data`` or ``--val-data``.  What botocore reads for credentials,
    region and endpoint, given to every Ray worker as the driver sees them
    (a cluster's workers do not inherit the driver's environment; ``--env``
    entries override these)."""
    environ = os.environ if environ is None else environ
    urls = [cfg.ckpt.ckpt_url] if uses_store(cfg.ckpt) else []
    urls += [u.strip() for paths in (cfg.data.data, cfg.data.val_data) for u in str(paths).split(",")]
    if not any(object_store.protocol(u) in ("s3", "s3a") for u in urls if u):
        return {}
    return {k: v for k, v in environ.items() if k.startswith("AWS_")}


def _show(options: dict) -> str:
    return " ".join(f"{k}=..." for k in options)
