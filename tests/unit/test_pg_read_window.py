"""The replication reader fixes its receive window only for a near server: a
small window across a long link would cap the stream."""

from __future__ import annotations

import socket

from dataflare.cdc.postgres.replication import NEAR_RTT_US, _rtt_us, fix_window


def test_the_window_is_fixed_only_for_a_near_server() -> None:
    assert fix_window(80)  # loopback
    assert fix_window(NEAR_RTT_US)
    assert not fix_window(NEAR_RTT_US + 1)
    assert not fix_window(50_000)  # another region: autotuning keeps the rate
    assert not fix_window(None)  # not known


def test_the_round_trip_of_a_loopback_connection_is_read() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with client, peer:
            client.sendall(b"x")
            assert peer.recv(1) == b"x"
            rtt = _rtt_us(client)
            assert rtt is not None and 0 < rtt <= NEAR_RTT_US
