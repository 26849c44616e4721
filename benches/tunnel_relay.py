#!/usr/bin/env python3
"""The comparison relay for benches/tunnel_load.sh: what Micronets'
websocket-proxy.py does, written small with the `websockets` library
(asyncio). TLS with a client certificate required (signed by --ca), peers
that connect to the same /micronets/v1/ws-proxy/<id> meet, every message
(text or binary) one sends goes to the other peers on that path, and a peer
is forgotten when it disconnects.

    tunnel_relay.py --port 5050 --cert server.pem --key server.key --ca ca.pem
"""

import argparse
import asyncio
import ssl

import websockets

PREFIX = "/micronets/v1/ws-proxy/"

# path -> the connections on it
peers = {}


async def relay(ws, path=None):
    if path is None:
        # websockets >= 13 (new asyncio API): ws.request; before: ws.path.
        request = getattr(ws, "request", None)
        path = request.path if request is not None else ws.path
    if not path.startswith(PREFIX) or len(path) == len(PREFIX):
        await ws.close(1008, "no such path")
        return
    group = peers.setdefault(path, set())
    group.add(ws)
    try:
        async for message in ws:
            for other in list(group):
                if other is not ws:
                    try:
                        await other.send(message)
                    except websockets.ConnectionClosed:
                        pass
    except websockets.ConnectionClosed:
        pass
    finally:
        group.discard(ws)
        if not group:
            peers.pop(path, None)


async def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5050)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--ca", required=True)
    a = p.parse_args()
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(a.cert, a.key)
    tls.load_verify_locations(a.ca)
    tls.verify_mode = ssl.CERT_REQUIRED
    async with websockets.serve(relay, a.host, a.port, ssl=tls, backlog=4096):
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main())
