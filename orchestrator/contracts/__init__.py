"""What the coordinator and the workers share, and all they share.

``workers/`` imports these modules and the store, never the rest of ``orchestrator/``;
``orchestrator/`` never imports ``workers/`` (tests/test_architecture.py holds both to it)::

    runspec      one run as data: ids, seed, assignments, bindings (what a message carries)
    conditions   one condition of a design (its factor levels), for planner and agent
    wire         the run message: task name, fields, version, task ids
    broker       which broker a URL names, and the options both sides must agree on
    worker_api   the worker's entry points the coordinator calls (embedded runs, the CLI)
    results      a run's outcome as data, and the one builder of failed results
    interrupt    the one run timer (SIGALRM in a process's main thread)
    canonical    canonical JSON and hashes (ids, digests)
    errors       the exception types and the exit codes they map to
    settings     ``STUDYQ_*`` settings, shared by both sides
    extensions   bindings and the execution policy of a study file
    deadletters  the dead-letter format of quarantined messages
"""
