"""Celery worker: turns queued jobs into ebca_core calls (see worker.celery_app, worker.runner)."""
