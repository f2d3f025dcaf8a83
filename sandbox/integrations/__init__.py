"""Adapters to other engines (each imports its engine only when imported itself).

- `sandbox.integrations.celery`: plugin functions as Celery tasks.
"""
