"""The one place that talks to Postgres.

``connector`` opens connections and the pool and turns psycopg's errors into
dlqd's own (``dlqd.errors``); ``queries`` loads the named SQL of ``sql/``;
``compose`` is the one module that composes SQL at run time (an operator's
target statement, policy matches), with ``psycopg.sql``; the stores (``claims``,
``replays``, ``limits``, ``maintenance``, ``entries``) run named queries for
the layers above. Nothing outside this package imports psycopg's connection or
error types.
"""
