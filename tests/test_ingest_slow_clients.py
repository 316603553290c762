"""Slow clients (slow headers, a body at a byte a second) cannot starve the others.

Bounded: a few hundred connections for a few seconds against a receiver with short deadlines
and few request slots; legitimate requests sent meanwhile must all be acknowledged, and the
receiver must close the slow connections once their deadlines pass.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ingest_helpers import block_rows, make_request
from test_ingest_receiver import PB, post

SLOW_HEADERS = 150
SLOW_BODIES = 150
DEADLINE = 2.0


async def _slow(port: int, body: bool, stop: float) -> tuple[float, bytes]:
    """Trickle a request until the server closes the connection; (seconds open, its answer)."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
        b"Content-Length: 100000\r\n\r\n"
    )
    if body:
        writer.write(head)
        trickle = b"\x0a"
    else:  # a header line that never ends
        writer.write(head[: head.index(b"Content-Length")] + b"X-Slow: ")
        trickle = b"a"
    answer = b""
    try:
        while time.monotonic() < stop:
            try:
                answer = await asyncio.wait_for(reader.read(4096), 0.25)
            except TimeoutError:
                writer.write(trickle)
                await writer.drain()
                continue
            break  # the server answered or closed
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
    return time.monotonic() - t0, answer


async def _legit(url: str, n: int) -> list[int]:
    statuses = []
    for i in range(n):
        body = make_request(2, seed=i, service=f"legit-{i}").SerializeToString()
        status, _, _ = await asyncio.to_thread(post, url, body, PB)
        statuses.append(status)
        await asyncio.sleep(0.05)
    return statuses


async def _scenario(rcv: Any) -> tuple[list[tuple[float, bytes]], list[int]]:
    stop = time.monotonic() + DEADLINE * 3
    slow = [
        asyncio.create_task(_slow(rcv.http_port, i >= SLOW_HEADERS, stop))
        for i in range(SLOW_HEADERS + SLOW_BODIES)
    ]
    await asyncio.sleep(0.5)  # every slow connection is in before the legitimate clients
    legit = await _legit(rcv.http_url, 20)
    return await asyncio.gather(*slow), legit


def test_slow_clients_do_not_starve_legitimate_ones(receiver_factory) -> None:
    rcv = receiver_factory(
        "--max-inflight",
        "8",
        "--header-timeout",
        str(DEADLINE),
        "--body-timeout",
        str(DEADLINE),
    )
    slow, legit = asyncio.run(_scenario(rcv))
    assert legit == [200] * 20
    assert len(block_rows(rcv.dsn)) == 20
    # Every slow connection was closed by the server, near its deadline (not at our stop).
    open_for = sorted(t for t, _ in slow)
    assert open_for[-1] < DEADLINE * 3 - 0.2, open_for[-5:]
    assert open_for[0] >= DEADLINE - 0.5
    bodies = [a for _, a in slow[SLOW_HEADERS:]]
    assert sum(a.startswith(b"HTTP/1.1 408") for a in bodies) == SLOW_BODIES
    # Still serving afterwards.
    assert post(rcv.http_url, make_request(1, service="after").SerializeToString(), PB)[0] == 200
