"""Recipe: the example plugins as Celery tasks (deployment: one Celery worker per machine).

    # on each worker machine (plugins and policies deployed at the same paths):
    SANDBOX_BROKER=redis://broker:6379/0 celery -A examples.recipes.celery_tasks worker --pool prefork -c 4
    # on a client:
    >>> from examples.recipes.celery_tasks import textstats
    >>> textstats.delay("to be or not to be").get(timeout=30)["words"]
    6

Each prefork child gets its own pool (one worker per plugin) and zygote on its first task; a
plugin's error comes back from `.get()` as the same SandboxError class. With `--pool threads -c N`
the one process holds a pool of N workers per plugin. Give each machine (or container) its own
`[identity] uid_range` in the policies when several hosts share a kernel with other hosts.
"""
import os

from celery import Celery

from sandbox.integrations.celery import plugin_task

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BROKER = os.environ.get("SANDBOX_BROKER", "redis://127.0.0.1:6379/0")

app = Celery("sandbox_plugins", broker=BROKER, backend=BROKER)
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                result_accept_content=["json"], worker_prefetch_multiplier=1, task_acks_late=True)


def plugin(name: str, function: str, **options):
    return plugin_task(app, os.path.join(ROOT, "examples", "plugins", name, "worker.py"), function,
                       policy=os.path.join(ROOT, "policies", f"{name}.toml"), name=f"plugins.{name}.{function}",
                       **options)


textstats = plugin("textstats", "stats")
markdown = plugin("markdown_render", "render")
thumbnail = plugin("thumbnail", "thumbnail", rate_limit="50/s")
