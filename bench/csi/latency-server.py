#!/usr/bin/env python3
"""Static files over HTTP/1.1 keep-alive with a fixed delay per request (asyncio: the delay costs
no CPU, so the client, not the server, is what gets measured). Prints PORT n."""
import asyncio, os, sys

root, latency = sys.argv[1], float(sys.argv[2])

async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ")[1].decode().split("?")[0]
            await asyncio.sleep(latency)
            full = os.path.realpath(os.path.join(root, path.lstrip("/")))
            if full.startswith(root) and os.path.isfile(full):
                body = open(full, "rb").read()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            else:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=512)
    print("PORT", server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

root = os.path.realpath(root)
asyncio.run(main())
