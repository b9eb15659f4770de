"""A heartbeating socket survives its peer leaving while its receive queue is full.

libzmq aborts the process in that state (a PING due on a connection whose input stopped at the
high-water mark and then failed), so each case runs in a child process of its own: a gateway-side
ROUTER flooded by a client that then disconnects, and a client-side DEALER flooded by a server that
then goes away. Real sockets over tcp; nothing reads the flooded socket until the peer is gone.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import zmq

from tandem.actors.sockets import make_socket

CHILD = """
import sys, time, zmq
from tandem.actors.sockets import make_socket

receiver_type = getattr(zmq, sys.argv[1])
ctx = zmq.Context()
receiver = make_socket(ctx, receiver_type, linger_ms=0)  # the house options, heartbeats on
if receiver_type == zmq.ROUTER:
    port = receiver.bind_to_random_port("tcp://127.0.0.1")
    peer = ctx.socket(zmq.DEALER)
    peer.connect(f"tcp://127.0.0.1:{port}")
    for _ in range(5000):  # past the default high-water mark of 1000
        peer.send(b"x" * 50)
else:
    peer = ctx.socket(zmq.ROUTER)
    port = peer.bind_to_random_port("tcp://127.0.0.1")
    receiver.connect(f"tcp://127.0.0.1:{port}")
    receiver.send(b"hello")
    ident, _ = peer.recv_multipart()
    for _ in range(5000):
        peer.send_multipart([ident, b"x" * 50])
time.sleep(0.3)
peer.close(linger=0)
time.sleep(0.2)
for _ in range(2):  # write to the dead connection, then let heartbeat PINGs fall due (1 s apart)
    try:
        if receiver_type == zmq.ROUTER:
            receiver.send_multipart([receiver.recv_multipart()[0], b"reply"], zmq.NOBLOCK)
        else:
            receiver.send(b"more", zmq.NOBLOCK)
    except zmq.ZMQError:
        pass
    time.sleep(1.2)
print("survived", flush=True)
"""


@pytest.mark.parametrize("receiver", ["ROUTER", "DEALER"])
def test_a_flooded_heartbeating_socket_survives_its_peer_leaving(receiver: str) -> None:
    done = subprocess.run([sys.executable, "-c", CHILD, receiver], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "survived" in done.stdout, (
        f"the process died (rc {done.returncode}): {done.stderr[-500:]}"
    )


def test_a_receive_limit_is_refused_with_heartbeats() -> None:
    ctx = zmq.Context()
    try:
        with pytest.raises(ValueError, match="rcvhwm=10 with ZMTP heartbeats"):
            make_socket(ctx, zmq.DEALER, rcvhwm=10)
        sock = make_socket(ctx, zmq.DEALER, rcvhwm=10, heartbeat_ivl_ms=None)
        assert sock.getsockopt(zmq.RCVHWM) == 10
        sock.close(linger=0)
        sock = make_socket(ctx, zmq.DEALER)
        assert sock.getsockopt(zmq.RCVHWM) == 0
        sock.close(linger=0)
    finally:
        ctx.destroy(linger=0)  # closes what a failed assert left open (term would wait on it)
