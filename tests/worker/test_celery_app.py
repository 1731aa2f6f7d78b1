from __future__ import annotations

from ebca_common.queueing import RUN_JOB_TASK
from worker.celery_app import app, settings


def test_worker_consumes_the_gpu_queue_with_late_acks() -> None:
    conf = app.conf
    assert conf.task_default_queue == settings.queue == "gpu"
    assert conf.task_routes[RUN_JOB_TASK] == {"queue": "gpu"}
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_concurrency == 1
    options = conf.broker_transport_options
    assert options["visibility_timeout"] == settings.visibility_timeout
    assert options["unacked_restore_interval"] == settings.restore_interval


def test_task_is_registered_under_the_shared_name() -> None:
    import worker.tasks  # noqa: F401  (registers the task)

    task = app.tasks[RUN_JOB_TASK]
    assert task.acks_late and task.reject_on_worker_lost


def test_one_runner_per_process_with_its_clients() -> None:
    """runner() builds the Redis client, storage and pipeline cache once per process, not per job."""
    from worker import tasks

    first = tasks.runner()
    assert tasks.runner() is first
    assert first.store is tasks.runner().store and first.storage is tasks.runner().storage


def test_heartbeat_reports_the_jobs_held_and_a_warm_shutdown() -> None:
    from worker.celery_app import Heartbeat

    beat = Heartbeat()
    with beat.holding("a"), beat.holding("b"):
        assert beat.jobs() == {"a", "b"}
    assert beat.jobs() == set()
    assert not beat.stopping
    beat.shut_down()  # what the SIGTERM handler calls: running jobs are handed back at their next step
    assert beat.stopping
