"""The HTTP peers: the same trivial handler served in-process and through a ProcessPoolExecutor.

    python -m benchmarks.web_apps inprocess|processpool PORT
"""
import asyncio
import contextlib
import concurrent.futures as cf
import multiprocessing as mp
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


def ping(*args):
    return "pong"


def make_app(mode: str) -> Starlette:
    pool = cf.ProcessPoolExecutor(2, mp_context=mp.get_context("forkserver")) if mode == "processpool" else None

    async def call(request: Request):
        args = await request.json()
        if pool is None:
            result = ping(*args)
        else:
            result = await asyncio.get_running_loop().run_in_executor(pool, ping, *args)
        return JSONResponse({"result": result})

    async def health(request):
        return JSONResponse({"status": "ok"})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if pool is not None:  # its workers and the forkserver end with the server, none outlives it
            pool.shutdown(wait=True, cancel_futures=True)
            from multiprocessing import forkserver
            stop = getattr(forkserver._forkserver, "_stop", None)
            if stop is not None:
                stop()

    return Starlette(routes=[Route("/plugins/bench/ping", call, methods=["POST"]), Route("/health", health)],
                     lifespan=lifespan)


if __name__ == "__main__":
    uvicorn.run(make_app(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
