"""The Multiface data service: serves published shards, reports completeness, runs ingest jobs.

Run it as ``multiface serve --data-root DIR --shard-root DIR`` (see :mod:`services.cli`), or
build the app in Python with :func:`services.app.create_app`. This package imports ``shards``
and never ``trainer``; its extra is ``multiface-stream[data]``.
"""
