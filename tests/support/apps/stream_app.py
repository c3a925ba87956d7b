"""Test upstream for the proxies: a real uvicorn server on 127.0.0.1:$CDSW_APP_PORT (or argv[1]).

* `/echo` (any method): the request as JSON (method, path, query, headers, body length).
* `/stream?chunks=N&interval=S`: N lines, one every S seconds (chunked), each with its send time.
* `/sse?events=N&interval=S`: the same as server-sent events.
* `/bytes?mb=M`: M MiB of data, produced 64 KiB at a time.
* `/upload` (POST): reads the body as a stream; answers its length and the time its first chunk came.
* `/-/healthz`: `success`, as Serve's HTTP proxy answers its health check.
* `/ws`: WebSocket echo (text and bytes); the text `close:<code>` closes with that code.
"""

import asyncio
import hashlib
import os
import sys
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

CHUNK = 64 * 1024


async def echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse(
        {
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "headers": {k: v for k, v in request.headers.items()},
            "body_length": len(body),
        },
        headers={"set-cookie": "upstream=1; Path=/", "x-upstream": "yes"},
    )


async def stream(request: Request) -> StreamingResponse:
    chunks = int(request.query_params.get("chunks", "5"))
    interval = float(request.query_params.get("interval", "0.5"))

    async def lines():  # type: ignore[no-untyped-def]
        for index in range(chunks):
            if index:
                await asyncio.sleep(interval)
            yield f"{index} {time.time():.6f}\n".encode()

    return StreamingResponse(lines(), media_type="text/plain")


async def sse(request: Request) -> StreamingResponse:
    events = int(request.query_params.get("events", "3"))
    interval = float(request.query_params.get("interval", "0.5"))

    async def stream_events():  # type: ignore[no-untyped-def]
        for index in range(events):
            if index:
                await asyncio.sleep(interval)
            yield f"data: {index} {time.time():.6f}\n\n".encode()

    return StreamingResponse(stream_events(), media_type="text/event-stream")


async def data(request: Request) -> StreamingResponse:
    total = int(float(request.query_params.get("mb", "1")) * 1024 * 1024)
    block = b"\x5a" * CHUNK

    async def blocks():  # type: ignore[no-untyped-def]
        sent = 0
        while sent < total:
            piece = block[: min(CHUNK, total - sent)]
            sent += len(piece)
            yield piece

    return StreamingResponse(
        blocks(), media_type="application/octet-stream", headers={"content-length": str(total)}
    )


async def upload(request: Request) -> JSONResponse:
    digest = hashlib.sha256()
    length = 0
    first_chunk_at = None
    async for chunk in request.stream():
        if chunk and first_chunk_at is None:
            first_chunk_at = time.time()
        digest.update(chunk)
        length += len(chunk)
    return JSONResponse({"length": length, "sha256": digest.hexdigest(), "first_chunk_at": first_chunk_at})


async def ws_echo(websocket: WebSocket) -> None:
    offered = websocket.scope.get("subprotocols") or []
    await websocket.accept(subprotocol=offered[0] if offered else None)
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                text = message["text"]
                if text.startswith("close:"):
                    await websocket.close(code=int(text.split(":", 1)[1]), reason="asked to")
                    return
                await websocket.send_text(f"echo:{text}")
            elif message.get("bytes") is not None:
                await websocket.send_bytes(message["bytes"])
    except WebSocketDisconnect:
        return


async def root(_: Request) -> PlainTextResponse:
    return PlainTextResponse("stream app")


app = Starlette(
    routes=[
        Route("/", root),
        Route("/-/healthz", lambda _request: PlainTextResponse("success")),  # as Serve's proxy answers
        Route("/echo", echo, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
        Route("/serve/echo", echo),  # as Serve with root_path /serve sees it
        Route("/stream", stream),
        Route("/sse", sse),
        Route("/bytes", data),
        Route("/upload", upload, methods=["POST"]),
        WebSocketRoute("/ws", ws_echo),
    ]
)

if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ["CDSW_APP_PORT"])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", ws="websockets-sansio")
