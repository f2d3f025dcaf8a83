"""A plugin that does what real plugins do: an asyncio loop, a temp file, time zones, a data
file of its own, and numpy when it is installed. `sandbox policy learn` is tested on it."""
import asyncio
import os
import tempfile
import zoneinfo

HERE = os.path.dirname(os.path.abspath(__file__))


def gather(n):
    async def square(i):
        await asyncio.sleep(0)
        return i * i

    async def main():
        return sum(await asyncio.gather(*(square(i) for i in range(n))))

    return asyncio.run(main())


def wake(value):
    """The loop's self-pipe: a socketpair written with send() (sendto without an address)."""
    async def main():
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        loop.call_soon_threadsafe(fut.set_result, value)
        return await fut

    return asyncio.run(main())


def scratch_roundtrip(text):
    with tempfile.TemporaryFile() as f:
        f.write(text.encode())
        f.seek(0)
        return f.read().decode()


def utc_offset(name):
    import datetime
    tz = zoneinfo.ZoneInfo(name)
    return datetime.datetime(2024, 1, 15, 12, tzinfo=tz).utcoffset().total_seconds()


def data_lines():
    with open(os.path.join(HERE, "data.txt")) as f:
        return [line.strip() for line in f if line.strip()]


def numpy_sum(n):
    try:
        import numpy
    except ImportError:
        return None
    return int(numpy.arange(n).sum())


def spawn():
    """Never called while learning: under the learned policy a fork must still be killed."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid
