"""The Celery app and its tasks: unpack and check archives, keep projections caught up."""
