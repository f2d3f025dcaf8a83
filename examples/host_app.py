"""An HTTP host for sandboxed plugins: Starlette + uvicorn, one AsyncPool per plugin.

    python examples/host_app.py --host 127.0.0.1 --port 8000 [--plugins examples/plugins]
                                [--policies policies] [--pool-size 2] [--max-queue 64]

Every `<plugins>/<name>/worker.py` that has a `<policies>/<name>.toml` is served; a plugin without a
policy, with a bad policy or that does not load is logged at start-up and skipped (clients see
only the error's kind). Only the names a plugin exports can be called. Client input is checked
(size while it is read, nesting depth, values msgpack can carry, the plugin's message cap) before
any worker sees it, so a client can never make a worker fail. See docs/http.md.

    POST /plugins/{name}/{function}   body: [args...]  or  {"args": [...], "kwargs": {...}}
                                      -> 200 {"result": ...}  |  4xx/5xx {"error": KIND, "detail": "..."}
    GET  /health                      never touches a worker
    GET  /metrics                     Prometheus text format
"""
import argparse
import asyncio
import base64
import json
import logging
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

import uvicorn  # noqa: E402
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest  # noqa: E402
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response  # noqa: E402
from starlette.routing import Route  # noqa: E402

from sandbox import AsyncPool, Policy  # noqa: E402
from sandbox import protocol  # noqa: E402
from sandbox.errors import (ConfinementError, LoadError, PluginError, PolicyError, PolicyViolation,  # noqa: E402
                            SandboxError)

log = logging.getLogger("host_app")
MAX_BODY = 16 << 20
MAX_DEPTH = 32  # arrays/objects in a body; well under the protocol's 64, so an echo comes back too
INT_RANGE = (-(1 << 63), (1 << 64) - 1)  # what msgpack carries
BYTES = "$bytes"  # {"$bytes": "<base64>"} stands for a bytes value, both ways
NEVER_CALLABLE = frozenset({"on_message", "post"})  # the plugin's own plumbing, whatever it exports

# error kind -> HTTP status (kinds are SandboxError.kind, the CLI's names)
STATUS = {
    "plugin-error": 422, "load-error": 502, "timeout": 504, "violation": 502, "crashed": 502,
    "memory": 502, "protocol": 502, "confinement-error": 502, "policy-error": 500,
    "queue-full": 503, "restart-limit": 503, "closed": 503, "not-found": 404, "bad-request": 400,
    "too-large": 413, "usage-error": 400,
}
# Errors whose text is for the operator (paths, a plugin's load-time output): logged, never sent.
PRIVATE = (LoadError, ConfinementError, PolicyError)


class BadRequest(Exception):
    kind = "bad-request"


class TooLarge(BadRequest):
    kind = "too-large"


def error(kind: str, detail: str, **extra) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": detail, **extra}, status_code=STATUS.get(kind, 500))


def check_input(obj) -> None:
    """Refuse what no worker should be handed: nesting past MAX_DEPTH, ints msgpack cannot carry,
    strings that are not UTF-8 (lone surrogates). Iterative: a hostile body cannot exhaust the stack."""
    stack = [(obj, 1)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, (list, dict)):
            if depth > MAX_DEPTH:
                raise BadRequest(f"arguments nested deeper than {MAX_DEPTH} levels")
            if isinstance(x, dict):
                stack.extend((k, depth) for k in x)
                x = x.values()
            stack.extend((v, depth + 1) for v in x)
        elif isinstance(x, bool) or x is None or isinstance(x, float):
            continue
        elif isinstance(x, int):
            if not INT_RANGE[0] <= x <= INT_RANGE[1]:
                raise BadRequest("an integer argument is outside the 64-bit range")
        elif isinstance(x, str) and not x.isascii():
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest("a string argument is not valid UTF-8 (a lone surrogate)") from None


def from_json(obj):
    """JSON -> plain data: {"$bytes": b64} objects become bytes (obj is depth-checked first)."""
    if isinstance(obj, list):
        return [from_json(x) for x in obj]
    if isinstance(obj, dict):
        if len(obj) == 1 and BYTES in obj:
            try:
                return base64.b64decode(obj[BYTES], validate=True)
            except (ValueError, TypeError):
                raise BadRequest(f"{BYTES} must hold base64 text") from None
        return {k: from_json(v) for k, v in obj.items()}
    return obj


def to_json(obj):
    """Plain data -> JSON-ready: bytes become {"$bytes": b64}."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {BYTES: base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, list):
        return [to_json(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    return obj


async def read_body(request: Request, cap: int = MAX_BODY) -> bytes:
    """The body, refused as soon as it is known to pass `cap`: by its Content-Length before a byte
    is read, else by counting while it streams in (never buffered whole first)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise BadRequest("Content-Length is not a number")
        if int(length) > cap:
            raise TooLarge(f"body of {length} bytes is over the {cap}-byte limit")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > cap:
            raise TooLarge(f"body is over the {cap}-byte limit")
    return bytes(buf)


def parse_body(raw: bytes):
    if len(raw) > MAX_BODY:
        raise TooLarge(f"body over {MAX_BODY} bytes")
    if not raw.strip():
        return [], {}
    try:
        body = json.loads(raw)
    except RecursionError:
        raise BadRequest(f"body is not JSON this server accepts: nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not JSON: {e}") from None
    if isinstance(body, list):
        check_input(body)
        return from_json(body), {}
    if isinstance(body, dict):
        extra = set(body) - {"args", "kwargs"}
        if extra:
            raise BadRequest(f"unknown body keys {sorted(extra)} (allowed: args, kwargs)")
        args, kwargs = body.get("args", []), body.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise BadRequest('"args" must be an array and "kwargs" an object')
        check_input(args)
        check_input(kwargs)
        return from_json(args), from_json(kwargs)
    raise BadRequest("body must be a JSON array of arguments or an object {args, kwargs}")


def check_fits(function: str, args, kwargs, raw_size: int, max_message: int) -> None:
    """The call must fit the plugin's message cap: a frame past it would end the worker. msgpack
    is at most ~2.3x the JSON it came from (a float), so only a large body is encoded to check."""
    if raw_size * 3 < max_message:
        return
    try:
        size = len(protocol.dumps([function, args, kwargs]))
    except (TypeError, ValueError, OverflowError) as e:
        raise BadRequest(f"arguments are not plain data: {e}") from None
    if size + 64 > max_message:
        raise TooLarge(f"arguments take {size} bytes; this plugin accepts messages up to {max_message} bytes")


def callable_from_outside(pool, function: str) -> bool:
    """Only what the plugin exports; while its workers have not said, its public functions."""
    if function in NEVER_CALLABLE:
        return False
    exports = getattr(pool, "exports", None)
    if exports is not None:
        return function in exports
    return not function.startswith("_")


class PoolCollector:
    """Live workers, restarts, queue depth: read from each pool's stats() at scrape time."""

    def __init__(self, host):
        self.host = host

    def collect(self):
        live = GaugeMetricFamily("sandbox_pool_live_workers", "Live workers per plugin pool", labels=["plugin"])
        busy = GaugeMetricFamily("sandbox_pool_busy_workers", "Workers running a call", labels=["plugin"])
        queued = GaugeMetricFamily("sandbox_pool_queued_calls", "Calls waiting for a worker", labels=["plugin"])
        restarts = CounterMetricFamily("sandbox_pool_restarts", "Workers replaced after a death", labels=["plugin"])
        recycled = CounterMetricFamily("sandbox_pool_recycled", "Workers replaced after max calls", labels=["plugin"])
        for name, pool in self.host.pools.items():
            s = pool.stats()
            live.add_metric([name], s["live"])
            busy.add_metric([name], s["busy"])
            queued.add_metric([name], s["queued"])
            restarts.add_metric([name], s["restarts"])
            recycled.add_metric([name], s["recycled"])
        return [live, busy, queued, restarts, recycled]


class Host:
    def __init__(self, plugins_dir, policies_dir, pool_size, max_queue):
        self.plugins_dir = os.path.abspath(plugins_dir)
        self.policies_dir = os.path.abspath(policies_dir)
        self.pool_size = pool_size
        self.max_queue = max_queue
        self.pools: dict[str, AsyncPool] = {}
        self.skipped: dict[str, dict] = {}
        self.started = time.time()
        self.registry = CollectorRegistry()
        self.calls = Counter("sandbox_http_calls", "Plugin calls over HTTP", ["plugin", "outcome"],
                             registry=self.registry)
        self.errors = Counter("sandbox_http_errors", "Failed plugin calls by error kind", ["plugin", "kind"],
                              registry=self.registry)
        self.latency = Histogram("sandbox_http_call_seconds", "Plugin call latency", ["plugin"],
                                 registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.registry.register(PoolCollector(self))
        self.library_metrics = _library_metrics(self.registry)

    # ---- life -------------------------------------------------------------------------------
    async def start(self):
        names = sorted(d for d in os.listdir(self.plugins_dir)
                       if os.path.isfile(os.path.join(self.plugins_dir, d, "worker.py"))) \
            if os.path.isdir(self.plugins_dir) else []
        await asyncio.gather(*(self._load(n) for n in names))
        log.info("serving %d plugin(s): %s", len(self.pools), ", ".join(sorted(self.pools)) or "none")

    async def _load(self, name):
        worker_py = os.path.join(self.plugins_dir, name, "worker.py")
        policy_path = os.path.join(self.policies_dir, f"{name}.toml")
        if not os.path.isfile(policy_path):
            return self._skip(name, "policy-error", f"no policy file {policy_path}")
        try:
            policy = Policy.load(policy_path)
            self.pools[name] = await AsyncPool.start(worker_py, policy=policy, size=self.pool_size,
                                                     max_queue=self.max_queue, name=name)
        except SandboxError as e:
            self._skip(name, e.kind, str(e))
        except Exception as e:  # a broken plugin must not stop the others
            self._skip(name, "load-error", f"{type(e).__name__}: {e}")

    def _skip(self, name, kind, detail):
        # The text (a path, what the plugin printed or raised while loading) is the operator's:
        # the log has it; clients see the kind alone.
        self.skipped[name] = {"error": kind}
        log.warning("skipped plugin %s: %s: %s", name, kind, detail)

    async def stop(self):
        pools, self.pools = self.pools, {}
        await asyncio.gather(*(p.close(timeout=2.0) for p in pools.values()), return_exceptions=True)
        log.info("all plugin pools closed")

    # ---- endpoints --------------------------------------------------------------------------
    async def health(self, request: Request):
        return JSONResponse({"status": "ok", "plugins": sorted(self.pools), "skipped": self.skipped,
                             "uptime": round(time.time() - self.started, 3)})

    async def metrics(self, request: Request):
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def call(self, request: Request):
        plugin, function = request.path_params["plugin"], request.path_params["function"]
        pool = self.pools.get(plugin)
        if pool is None:
            why = self.skipped.get(plugin)
            return error("not-found", f"no plugin {plugin!r}" + (f" (skipped: {why['error']})" if why else ""))
        if not callable_from_outside(pool, function):
            return error("not-found", f"plugin {plugin} exports no function {function!r}")
        try:
            raw = await read_body(request)
            args, kwargs = parse_body(raw)
            check_fits(function, args, kwargs, len(raw), pool.policy.limits.max_message_bytes)
        except BadRequest as e:
            response = error(e.kind, str(e))
            if isinstance(e, TooLarge):
                response.headers["Connection"] = "close"  # what is left of the body is not read
            return self._count(plugin, e.kind, response)
        started = time.perf_counter()
        try:
            result = await pool.call(function, *args, **kwargs)
        except SandboxError as e:
            self.latency.labels(plugin).observe(time.perf_counter() - started)
            return self._count(plugin, *self._describe(plugin, function, e))
        except (TypeError, ValueError, OverflowError) as e:  # arguments that are not plain data
            return self._count(plugin, "bad-request", error("bad-request", f"arguments are not plain data: {e}"))
        self.latency.labels(plugin).observe(time.perf_counter() - started)
        try:
            body = json.dumps({"result": to_json(result)}, allow_nan=False).encode()
        except (ValueError, TypeError) as e:
            return self._count(plugin, "plugin-error", error("plugin-error", f"result is not JSON: {e}"))
        self.calls.labels(plugin, "ok").inc()
        return Response(body, media_type="application/json")

    def _describe(self, plugin, function, e: SandboxError):
        if isinstance(e, PRIVATE):
            log.warning("plugin %s: %s: %s", plugin, e.kind, e)
            return e.kind, error(e.kind, f"plugin {plugin} could not serve the call ({e.kind}; see the server log)")
        if (isinstance(e, PluginError) and e.type == "AttributeError"
                and e.message.startswith("plugin has no public function")):
            return "not-found", error("not-found", f"plugin {plugin} exports no function {function!r}")
        if isinstance(e, PolicyViolation):
            return e.kind, error(e.kind, str(e), syscall=e.syscall)
        if isinstance(e, PluginError):
            return e.kind, error(e.kind, str(e), type=e.type)
        return e.kind, error(e.kind, str(e))

    def _count(self, plugin, kind, response):
        self.calls.labels(plugin, kind).inc()
        self.errors.labels(plugin, kind).inc()
        return response


def _library_metrics(registry):
    """The library's own Prometheus collector (workers, starts, calls, violations) in the app's
    registry, where the installed sandbox has one; the pool and HTTP counters above stay."""
    try:
        from sandbox import metrics
    except ImportError:
        return None
    enable = getattr(metrics, "enable", None)
    return enable(registry) if callable(enable) else None


def build_app(host: Host) -> Starlette:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        await host.start()
        try:
            yield
        finally:
            await host.stop()

    return Starlette(routes=[
        Route("/health", host.health, methods=["GET"]),
        Route("/metrics", host.metrics, methods=["GET"]),
        Route("/plugins/{plugin}/{function}", host.call, methods=["POST"]),
    ], lifespan=lifespan)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--plugins", default=os.path.join(HERE, "plugins"))
    ap.add_argument("--policies", default=os.path.join(os.path.dirname(HERE), "policies"))
    ap.add_argument("--pool-size", type=int, default=2)
    ap.add_argument("--max-queue", type=int, default=64, help="queued calls per plugin before 503")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    host = Host(args.plugins, args.policies, args.pool_size, args.max_queue)
    config = uvicorn.Config(build_app(host), host=args.host, port=args.port, log_level=args.log_level,
                            lifespan="on", timeout_graceful_shutdown=3, access_log=False)
    # uvicorn turns SIGINT/SIGTERM into a graceful shutdown: requests finish (bounded), then the
    # lifespan closes every pool, so no worker outlives the server.
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
