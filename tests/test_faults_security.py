"""The fault monitor's inbox against a network peer: nothing received is
unpickled, frames need the job's secret, verdicts cannot be forged, the
listener is bound to the address it was given.  One process, real sockets."""
import json
import os
import pickle
import socket
import threading
import time

import pytest

from loom.comms import trace
from loom.faults import Aggregator, Monitor, StoreAggregator, StoreTransport, wire
from loom.launch.fault_watch import AggregatorActor, pack_contact, unpack_contact

SECRET = b"s" * 32


class _Boom:
    """Unpickling it runs a shell command that creates a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _report(rank=0, **extra):
    return {"rank": rank, "pid": os.getpid(), "host": "h", "t": 1.0, "recs": [], **extra}


def _until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


def _send(sock, sealed):
    sock.sendall(wire.frame(sealed))


def test_aggregator_never_unpickles_a_report(tmp_path):
    marker = tmp_path / "pwned"
    agg = Aggregator(2, check_pids=False)
    assert agg.ingest(pickle.dumps(_Boom(marker))) is False
    assert agg.ingest(pickle.dumps(_report())) is False  # a well-formed report, pickled: still refused
    assert not marker.exists()
    assert agg.rejected["malformed"] == 2 and agg.heard == {}


@pytest.mark.parametrize("bad,needle", [
    (_report(rank=2), "rank=2 must be an integer in [0, 2)"),
    (_report(rank=True), "rank=True"),
    (_report(rank="0"), "rank='0'"),
    (_report(t=float("nan")), "NaN is not allowed"),
    (_report(t=10 ** 400), "must be a finite number"),
    (_report(host=["h"]), "host="),
    (_report(recs={"a": 1}), "recs must be a list"),
    (_report(recs=[["world", 0, "all_reduce", 4]], groups={"world": [0, 1]}), "recs[0] must be a list of 9"),
    (_report(recs=[["world", 0, "all_reduce", 4, None, [], 1.0, None, 0]]), "never declared"),
    (_report(recs=[["world", 0, "send", 4, 7, [], 1.0, None, 0]], groups={"world": [0, 1]}), "recs[0].peer=7"),
    (_report(recs=[["world", -1, "all_reduce", 4, None, [], 1.0, None, 0]], groups={"world": [0, 1]}),
     "recs[0].seq=-1"),
    (_report(recs=[["world", 0, "all_reduce", 4, None, [], 2.0, 1.0, 0]], groups={"world": [0, 1]}),
     "t_exit=1.0 is before t_enter=2.0"),
    (_report(recs=[["world", 0, "all_reduce", 4, None, ["f32", "x"], 1.0, None, 0]], groups={"world": [0, 1]}),
     "recs[0].shape"),
    (_report(groups={"world": [0, 0]}), "repeat a rank"),
    (_report(groups={"world": [0, 5]}), "member=5"),
    (_report(background=["ckpt"]), "background group 'ckpt' was never declared"),
    (_report(bye="yes"), "bye='yes'"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    (b"\xff\xfe", "utf-8"),
    (b'{"rank": 0, "t": -Infinity}', "-Infinity is not allowed"),
])
def test_malformed_reports_are_dropped_counted_and_named(bad, needle, caplog):
    agg = Aggregator(2, check_pids=False)
    payload = bad if isinstance(bad, bytes) else json.dumps(bad, allow_nan=True).encode()
    assert agg.ingest(payload) is False
    assert agg.rejected["malformed"] == 1 and agg.heard == {} and agg.group_ranks == {0: {}, 1: {}}
    assert needle in caplog.text
    assert agg.ingest(json.dumps(_report(rank=1)).encode()) is True  # and it keeps working
    assert set(agg.heard) == {1}


def test_reports_given_as_dicts_are_checked_too():
    agg = Aggregator(2, check_pids=False)
    assert agg.ingest(_report(t=float("inf"))) is False and agg.ingest(_report(pid=-1)) is False
    assert agg.rejected["malformed"] == 2 and agg.heard == {}


def test_outside_client_cannot_run_code_and_the_aggregator_keeps_working(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Boom(marker))
    trace.reset_trace()
    with StoreAggregator(2, check_pids=False) as agg:
        host, port = agg.address
        with socket.create_connection((host, port)) as raw:  # a bare pickle, as the old inbox took it
            raw.sendall(evil)
            assert _until(lambda: agg.rejected["oversize"] == 1)  # its first bytes announce a huge frame
            assert raw.recv(10) == b""                             # and the connection is closed
        with socket.create_connection((host, port)) as peer:
            _send(peer, os.urandom(32) + evil)                     # framed, with a made-up MAC
            _send(peer, wire.seal(b"x" * 32, wire.REPORT, evil))  # sealed under another secret
            _send(peer, wire.seal(agg.secret, wire.REPORT, evil))  # even with the secret: data, never code
            reply = wire.read_frame(peer)
        assert _until(lambda: agg.rejected["auth"] == 2 and agg.rejected["malformed"] == 1)
        assert wire.unseal(agg.secret, wire.REPLY, reply) is not None  # answered, sealed
        mon = Monitor((host, port), rank=0, secret=agg.secret, interval=60).start()
        mon.stop()
        assert agg.aggregator.departed == {0} and agg.error is None and agg._thread.is_alive()
    assert not marker.exists()


def test_frames_without_a_valid_mac_are_ignored_and_counted():
    body = json.dumps(_report(rank=1)).encode()
    with StoreAggregator(2, check_pids=False) as agg:
        with socket.create_connection(agg.address, timeout=10) as peer:
            _send(peer, body)                                             # no MAC at all
            _send(peer, b"short")                                         # shorter than a MAC
            _send(peer, wire.seal(agg.secret, wire.REPORT, body)[:-1] + b"}!")  # altered after sealing
            _send(peer, wire.seal(agg.secret, wire.REPLY, body))         # sealed for the other direction
            assert _until(lambda: agg.rejected["auth"] == 4)
            assert agg.aggregator.heard == {}
            sealed = wire.seal(agg.secret, wire.REPORT, body)
            _send(peer, sealed)
            reply = json.loads(wire.unseal(agg.secret, wire.REPLY, wire.read_frame(peer)))
        assert reply == {"verdict": None, "re": sealed[:wire.MAC_BYTES].hex()}  # only the valid one is answered
        assert set(agg.aggregator.heard) == {1} and agg.rejected["auth"] == 4


def test_ray_aggregator_actor_verifies_pushes_too():
    actor = AggregatorActor(2, {}, SECRET)
    body = json.dumps(_report(rank=1)).encode()
    assert actor.push(body) is False
    assert actor.push(wire.seal(b"t" * 32, wire.REPORT, body)) is False
    assert actor.push(pickle.dumps(_report(rank=1))) is False
    assert actor.rejected() == {"auth": 3} and actor.aggregator.heard == {}
    assert actor.push(wire.seal(SECRET, wire.REPORT, body)) is True and set(actor.aggregator.heard) == {1}


class _FakeAggregator(threading.Thread):
    """Answers every report with ``make(request_mac) -> reply frame contents``."""

    def __init__(self, make):
        super().__init__(daemon=True)
        self.make, self.sock = make, socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()[:2]

    def run(self):
        conn, _ = self.sock.accept()
        with conn:
            try:
                while True:
                    sealed = wire.read_frame(conn)
                    conn.sendall(wire.frame(self.make(sealed[:wire.MAC_BYTES])))
            except (ConnectionError, OSError):
                pass


_HANG = {"kind": "hang", "ranks": [1], "link": None, "group": "world", "seqs": [4], "score": 2.0,
         "evidence": "forged", "step": 2}


@pytest.mark.parametrize("forge", ["other_secret", "unsealed", "other_report", "not_fatal", "genuine"])
def test_forged_verdict_does_not_trigger_on_fatal(forge):
    def make(request_mac):
        verdict = {**_HANG, "kind": "straggler"} if forge == "not_fatal" else _HANG
        re = os.urandom(wire.MAC_BYTES).hex() if forge == "other_report" else request_mac.hex()
        body = wire.dumps({"verdict": verdict, "re": re})
        if forge == "unsealed":
            return body
        return wire.seal(b"o" * 32 if forge == "other_secret" else SECRET, wire.REPLY, body)

    server = _FakeAggregator(make)
    server.start()
    fatal = []
    trace.reset_trace()
    mon = Monitor(server.address, rank=0, secret=SECRET, interval=0.02, on_fatal=fatal.append).start()
    time.sleep(0.3)
    mon.stop()
    if forge == "genuine":  # the control: a verdict sealed by the job's aggregator is acted on
        assert [f.evidence for f in fatal] == ["forged"]
    else:
        assert fatal == [] and mon.fatal is None and mon.transport.rejected >= 3


def test_listener_is_bound_to_the_given_host_only():
    with StoreAggregator(2, host="127.0.0.1") as agg:
        port = agg.address[1]
        assert agg._listener.sock.getsockname() == ("127.0.0.1", port)
        others = {"127.0.0.2"}  # the rest of 127/8 is this machine too, on Linux
        try:  # the address this machine reaches the network from, where it has one
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect(("192.0.2.1", 9))
                others.add(probe.getsockname()[0])
        except OSError:
            pass
        for other in sorted(others - {"127.0.0.1"}):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((other, port), timeout=5).close()
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_connections_are_bounded_and_silent_peers_evicted():
    with StoreAggregator(2, max_connections=6) as agg:
        idle = [socket.create_connection(agg.address, timeout=5) for _ in range(10)]
        try:
            assert _until(lambda: agg.rejected["evicted"] >= 4)
            assert len(agg._listener.conns) <= 6
            assert idle[0].recv(1) == b""  # the oldest silent peer was let go
            mon = Monitor(agg.address, rank=0, secret=agg.secret, interval=60).start()  # a real rank still gets in
            mon.stop()
            assert agg.aggregator.departed == {0}
        finally:
            for s in idle:
                s.close()


def test_transport_and_monitor_need_the_secret():
    with StoreAggregator(2) as agg:
        with pytest.raises(ValueError, match="needs the job's secret"):
            Monitor(agg.address, rank=0)
        with pytest.raises(ValueError, match="at least 16"):
            StoreTransport(*agg.address, secret=b"short")
    with pytest.raises(TypeError, match="must be bytes"):
        StoreAggregator(2, secret="a string")


def test_contact_layout_round_trip():
    packed = pack_contact("node-0.example", 29500, SECRET)
    assert len(packed) == 515 and unpack_contact(packed) == ("node-0.example", 29500, SECRET)
    with pytest.raises(ValueError, match="no aggregator contact"):
        unpack_contact(bytes(515))
    with pytest.raises(ValueError, match="255 bytes"):
        pack_contact("h" * 300, 1, SECRET)


def _exchange(secret_env):
    """Every rank runs the torchrun path's contact exchange; returns what it got."""
    import torch.distributed as dist
    from loom.launch.config import build_config
    from loom.launch.fault_watch import _store_aggregator
    rank = dist.get_rank()
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ.pop("LOOM_JOB_SECRET", None)
    if secret_env is not None and rank == 0:  # only rank 0's environment counts
        os.environ["LOOM_JOB_SECRET"] = secret_env
    try:
        agg, address, secret = _store_aggregator(build_config(), None, rank, dist.get_world_size())
    except (ValueError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        os.environ.pop("LOOM_JOB_SECRET", None)
    bound = agg._listener.sock.getsockname()[0] if agg is not None else None
    if agg is not None:
        agg.stop()
    return address, secret, bound


@pytest.mark.timeout(120)
def test_torchrun_contact_travels_by_broadcast(distributed):
    (a0, s0, bound), (a1, s1, _) = distributed(_exchange, 2, None)
    assert a0 == a1 and a0[0] == "127.0.0.1" and bound == "127.0.0.1"
    assert s0 == s1 and len(s0) == 32
    (_, s0, _), (_, s1, _) = distributed(_exchange, 2, "a-job-secret-of-some-length")
    assert s0 == s1 == b"a-job-secret-of-some-length"
    out = distributed(_exchange, 2, "short")  # rank 0 cannot start it: every rank raises, none waits
    assert out == ["ValueError: LOOM_JOB_SECRET has 5 bytes; it needs at least 16",
                   "RuntimeError: rank 1: rank 0 could not start the fault aggregator (no aggregator contact "
                   "was sent)"]
