"""Reaching Ray: a local instance of the job's own, or an existing cluster.

- No address: a new local instance sized to the job (``ray.init(address=
  "local")``), whatever else runs on the machine and whatever ``RAY_ADDRESS``
  says; nothing is shipped (the workers see this machine's files and loom).
- ``address="auto"``: Ray's own rule (``RAY_ADDRESS``, else the cluster last
  started on this machine).
- ``address="host:port"`` or ``"ray://host:10001"``: that cluster.  Token
  authentication is used the way ``ray start`` decides it (a token in
  ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), and
  loom itself travels to the workers as a Ray ``py_modules`` package (plus
  the job's ``working_dir`` when given).

Before waiting on a placement group, `check_capacity` compares what the job
asks for with what the cluster's nodes have, so an impossible job fails at
once instead of after the start timeout.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import socket
import tempfile
import time

import ray

log = logging.getLogger("loom.launch")

LOCAL = ("", "local")
CLIENT_EXTRA = "pip install 'loom-train[cluster]'"


class LaunchError(RuntimeError):
    """The job could not start or a worker failed; the message names the rank.

    ``rank``: the rank the message names first (None when the job did not
    start); ``__cause__``: that rank's own exception where one was raised.
    A failure of a running job also says what it was (``kind``: ``died``,
    ``actor_lost``, ``exception`` or the fault monitor's kind, e.g. ``hang``,
    ``lost_rank``), the step the monitor saw it at (``step``, or None), and
    ``remote_traceback``, the failing rank's traceback where it raised.
    ``ranks``: every rank the failure names as a culprit (the ranks of a
    lost node, the monitor's fault's); default ``(rank,)``."""

    def __init__(self, message: str, rank: int | None = None, *, kind: str | None = None,
                 step: int | None = None, remote_traceback: str | None = None, ranks=None):
        super().__init__(message)
        self.rank, self.kind, self.step, self.remote_traceback = rank, kind, step, remote_traceback
        self.ranks = tuple(sorted(ranks)) if ranks is not None else ((rank,) if rank is not None else ())


def is_local(address: str | None) -> bool:
    return (address or "") in LOCAL


def address_problem(address: str | None) -> str | None:
    """What is wrong with ``address`` before anything starts, or None: not
    host:port, ray://host:port, auto or empty; or a ``ray://`` address
    without Ray Client (the ``ray[client]`` extra, i.e. grpcio)."""
    if is_local(address) or address == "auto":
        return None
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit() or ("://" in address and not address.startswith("ray://")):
        return f"--address={address!r} must be host:port, ray://host:port or auto"
    if address.startswith("ray://") and importlib.util.find_spec("grpc") is None:
        return (f"--address={address} connects through Ray Client, which needs the ray[client] extra "
                f"(grpcio): {CLIENT_EXTRA}; or use the cluster's GCS address host:6379 from a node "
                f"of the cluster")
    return None


def enable_token_auth() -> bool:
    """Use token authentication to join a cluster when ``ray start`` would:
    ``RAY_AUTH_MODE`` unset and a token available (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``).  Returns whether it is on.

    Ray (>= 2.59) starts every local instance, and every ``ray start --head``
    that finds a token, with token authentication, but a driver given an
    explicit address never turns it on by itself: without this, joining such
    a cluster fails with ``InvalidAuthToken``.  A client with a token also
    joins clusters without authentication (tested), so this is safe."""
    if "RAY_AUTH_MODE" in os.environ:
        return os.environ["RAY_AUTH_MODE"].lower() == "token"
    try:  # Ray's own rule, as `ray start --head` applies it
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
    except ImportError:  # a Ray without token authentication
        return False
    return maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _loom_tree(dest: str) -> str:
    """A copy of the importable loom package (every ``loom.*`` subpackage,
    also when they live in separate folders, as in an editable install) under
    ``dest/loom``; returns that path."""
    import loom
    root = os.path.join(dest, "loom")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(loom.__path__[0], root, ignore=ignore)
    seen = set()
    for base in (loom.__path__[0], os.path.dirname(loom.__path__[0])):
        for name in sorted(os.listdir(base)):
            if name in seen or not name.isidentifier() or not os.path.isdir(os.path.join(base, name)):
                continue
            spec = importlib.util.find_spec(f"loom.{name}")
            if spec is None or not spec.submodule_search_locations:
                continue
            seen.add(name)
            target = os.path.join(root, name)
            if not os.path.exists(target):
                shutil.copytree(list(spec.submodule_search_locations)[0], target, ignore=ignore)
    return root


def runtime_env(address: str | None, working_dir: str = "", user: dict | None = None) -> tuple[dict | None, str | None]:
    """The Ray ``runtime_env`` for a job at ``address``: ``user``'s (a Ray
    runtime_env dict) plus, on a cluster, loom as a ``py_modules`` package
    and ``working_dir``.  Returns (runtime_env or None, a temporary folder to
    remove after ``ray.init``).  A local instance ships nothing."""
    env = dict(user or {})
    if working_dir:
        if not os.path.isdir(working_dir):
            raise LaunchError(f"--working-dir={working_dir!r} is not a directory")
        if "working_dir" in env:
            raise LaunchError("give the working directory once: --working-dir or runtime_env['working_dir']")
        env["working_dir"] = working_dir
    if is_local(address):
        return env or None, None
    staging = tempfile.mkdtemp(prefix="loom-ship-")
    env["py_modules"] = [*env.get("py_modules", []), _loom_tree(staging)]
    return env, staging


def connect(address: str | None, num_cpus: float, runtime_env_: dict | None = None) -> None:
    """Start the job's own local Ray instance (``num_cpus`` CPUs) or join
    ``address``; raises LaunchError naming the address when that fails."""
    if is_local(address):
        ray.init(address="local", num_cpus=max(1, math.ceil(num_cpus)), include_dashboard=False,
                 log_to_driver=True, runtime_env=runtime_env_)
        return
    problem = address_problem(address) or unreachable(address)
    if problem:
        raise LaunchError(problem)
    enable_token_auth()
    try:
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env_)
    except (ConnectionError, ray.exceptions.RaySystemError, RuntimeError, ValueError) as exc:
        token = ("" if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else
                 " If the cluster uses token authentication, copy its token (`ray get-auth-token` on the "
                 "head) to ~/.ray/auth_token or RAY_AUTH_TOKEN here.")
        raise LaunchError(f"could not join the Ray cluster at {address}: {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}. Is it running "
                          f"(`ray status --address {address}` on a node)?{token}") from None


def unreachable(address: str, timeout: float = 5.0) -> str | None:
    """Why nothing answers at ``address`` (host:port or ray://host:port), or
    None; "auto" is left to Ray.  Ray itself retries a dead address for
    minutes: this answers in at most ``timeout`` seconds."""
    if address == "auto":
        return None
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        return (f"nothing answers at --address={address} ({exc.strerror or exc}): is the cluster's head "
                f"running there (`ray start --head --port {port}` prints its address)?")
    return None


def _fits(node: dict, bundle: dict) -> int:
    """How many ``bundle``s a node with ``node`` resources holds."""
    return min((int(node.get(r, 0) // v) if v > 0 else 1 << 30) for r, v in bundle.items())


def _fmt(resources: dict) -> str:
    keys = [k for k in ("CPU", "GPU") if k in resources] + sorted(
        k for k in resources if k not in ("CPU", "GPU") and not k.startswith(("node:", "memory", "object_store")))
    return ", ".join(f"{k} {resources[k]:g}" for k in keys) or "nothing"


def check_capacity(bundle: dict, count: int, nodes: list[dict] | None = None) -> None:
    """Raise LaunchError when the cluster can never hold ``count`` workers of
    ``bundle`` each (a bundle must fit on one node): no node is big enough,
    or all nodes together hold fewer.  ``nodes``: the ``Resources`` of each
    live node (default: from ``ray.nodes()``)."""
    if nodes is None:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    per_node = [_fits(n, bundle) for n in nodes]
    if sum(per_node) >= count:
        return
    listing = _listing(nodes)
    if not any(per_node):
        raise LaunchError(f"no node of the Ray cluster can hold a worker ({_fmt(bundle)} each; a worker "
                          f"runs on one node): {listing}. Lower --cpus-per-worker, use --device cpu, or "
                          f"add bigger nodes")
    raise LaunchError(f"the Ray cluster can hold {sum(per_node)} of the {count} workers ({_fmt(bundle)} "
                      f"each): {listing}. Use fewer workers, lower --cpus-per-worker, or add nodes")


def wait_placed(pg, bundle: dict, count: int, timeout: float, notify=None, every: float = 10.0) -> None:
    """Wait until the placement group is placed (others' jobs may hold the
    resources for a while), saying so every ``every`` s through ``notify``
    (and the ``loom.launch`` logger); LaunchError after ``timeout`` s."""
    start = time.monotonic()
    ready = pg.ready()
    while True:
        left = timeout - (time.monotonic() - start)
        done, _ = ray.wait([ready], timeout=max(0.0, min(every, left)))
        if done:
            ray.get(ready)
            return
        waited = time.monotonic() - start
        free = _fmt(ray.available_resources())
        if waited >= timeout:
            raise LaunchError(f"Ray could not place {count} workers ({_fmt(bundle)} each) within "
                              f"{timeout:.0f}s: the cluster has them, but others hold them (free now: "
                              f"{free}); try again later or raise --start-timeout")
        text = f"waiting for Ray to place {count} workers ({_fmt(bundle)} each): {waited:.0f}s; free now: {free}"
        log.info(text)
        if notify is not None:
            notify(text)


def _listing(nodes: list[dict]) -> str:
    return "; ".join(f"node {i}: {_fmt(n)}" for i, n in enumerate(nodes)) or "no live nodes"


def poll_until(ready, timeout: float, waiting, notify=None, every: float = 10.0, poll: float = 0.2) -> bool:
    """Call ``ready()`` every ``poll`` s until it is true (returns True) or
    ``timeout`` s have passed (False); every ``every`` s meanwhile, say
    ``waiting(seconds so far)`` through ``notify`` and the ``loom.launch``
    logger."""
    start = said = time.monotonic()
    while True:
        if ready():
            return True
        now = time.monotonic()
        if now - start >= timeout:
            return False
        if now - said >= every:
            said = now
            text = waiting(now - start)
            log.info(text)
            if notify is not None:
                notify(text)
        time.sleep(poll)


def wait_replaced(pg, bundle: dict, count: int, timeout: float, notify=None, every: float = 10.0,
                  poll: float = 0.2) -> None:
    """After a node of the job was lost: wait until Ray has placed every
    bundle of ``pg`` again (Ray re-places a lost node's bundles by itself,
    on a node with room, e.g. a spare), saying so every ``every`` s through
    ``notify`` (and the ``loom.launch`` logger).  Returns at once when
    nothing is missing.  Raises LaunchError after ``timeout`` s, naming what
    the live nodes can hold, or at once if the placement group was removed."""
    from ray.util import placement_group_table

    def placed() -> bool:
        state = placement_group_table(pg).get("state")
        if state == "REMOVED":
            raise LaunchError("the job's placement group was removed while restarting (by hand, or the job's "
                              "driver lost the cluster); start the job again")
        return state == "CREATED"

    def waiting(seconds: float) -> str:
        return (f"waiting for Ray to place the workers of a lost node again: {seconds:.0f}s; "
                f"free now: {_fmt(ray.available_resources())}")

    if not poll_until(placed, timeout, waiting, notify, every, poll):
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        held = sum(_fits(n, bundle) for n in nodes)
        raise LaunchError(f"Ray could not place the {count} workers ({_fmt(bundle)} each) again within "
                          f"{timeout:.0f}s after a node was lost: the live nodes hold {held} of them "
                          f"({_listing(nodes)}). Add a node, or raise --start-timeout to wait longer")
