"""The coordinator's public door: Flower's Fleet API and nothing else.

Flower 1.42's SuperLink serves its Fleet, Control and Runtime APIs from one FastAPI app
on one `--host/--port` (flwr/superlink/main.py `create_app` includes all three routers;
`--fleet-api-address` and `--control-api-address` are deprecated and no longer move the
HTTP routes). The Control API has no authentication outside Flower's enterprise OIDC
plugin, so anyone reaching that port with the public `ca.crt` could list, submit and stop
runs. fedmoe therefore binds the SuperLink to 127.0.0.1 and puts this gate on the public
address: it terminates TLS with the federation's certificate and forwards only
`POST /v1/fleet/<name>` to the SuperLink, body and headers unchanged (SuperNode
authentication signs headers; the SuperLink checks them). Every other request is a 404
here, so the Control and Runtime APIs are not reachable from the network at all.

Run as `python -m fedmoe.server.federation.fleet_gate ...` by the coordinator.
"""

from __future__ import annotations

import argparse
import re
import ssl
import sys

# Exactly the Fleet endpoints' shape (/v1/fleet/pull-messages, ...): no dots, no
# percent-escapes, no second slash, no query, so no path can be normalised upstream into
# /v1/control/... .
FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z-]{0,63}")
MAX_BODY = 64 * 1024 * 1024  # Flower sends arrays in 5 MB chunks; bound what one request may hold in memory
# Hop-by-hop headers and those this gate rewrites itself.
DROP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers", "transfer-encoding",
        "upgrade", "host", "content-length", "accept-encoding", "content-encoding", "server", "date"}


async def _reply(send, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def make_app(upstream: str, verify: ssl.SSLContext | bool, timeout: float = 300.0):
    """An ASGI app forwarding Fleet API calls to `upstream` (https://127.0.0.1:PORT)."""
    import httpx

    clients: list = []

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    clients.append(httpx.AsyncClient(base_url=upstream, verify=verify, timeout=timeout))
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    for c in clients:
                        await c.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if scope["method"] != "POST" or scope.get("query_string") or not FLEET_PATH.fullmatch(path):
            await _reply(send, 404, "not served here: this address serves only the Flower Fleet API\n")
            return
        body, more = bytearray(), True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > MAX_BODY:
                await _reply(send, 413, "request too large\n")
                return
        headers = [(k, v) for k, v in scope["headers"] if k.decode("latin-1").lower() not in DROP]
        try:
            r = await clients[0].post(path, content=bytes(body), headers=headers)
        except httpx.HTTPError as exc:
            # 503 is what Flower's SuperNode retries on (flwr/supercore/heartbeat.py), as when the SuperLink restarts.
            await _reply(send, 503, f"SuperLink unreachable: {type(exc).__name__}\n")
            return
        content = r.content
        out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in r.headers.multi_items() if k.lower() not in DROP]
        out.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": r.status_code, "headers": out})
        await send({"type": "http.response.body", "body": content})

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(prog="fleet_gate", description=__doc__.splitlines()[0])
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="the SuperLink on loopback: https://127.0.0.1:PORT (or http:// with --insecure)")
    p.add_argument("--upstream-ca", help="CA certificate the loopback SuperLink's certificate is checked against")
    p.add_argument("--certfile")
    p.add_argument("--keyfile")
    args = p.parse_args(argv)
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=args.upstream_ca) if args.upstream_ca else False
    app = make_app(args.upstream, verify)
    uvicorn.run(app, host=args.host, port=args.port, ssl_certfile=args.certfile, ssl_keyfile=args.keyfile,
                log_level="warning", access_log=False, lifespan="on", server_header=False, date_header=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
