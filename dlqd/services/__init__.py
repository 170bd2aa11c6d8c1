"""Background services of ``dlqd run``, one module each, one shape (``base``).

| service | runs on | does |
| --- | --- | --- |
| ``listener`` | every replica | LISTEN connection, reconnects, self-probe, wakes the replayers |
| ``sweeper`` | every replica | moves rows that bypassed the insert trigger into the inbox |
| ``collector`` | every replica | refreshes the gauges, so a scrape runs no query |
| ``health`` | every replica | keeps "database reachable" fresh for ``/readyz`` |
| ``watchdog`` | every replica, under systemd | ``WATCHDOG=1`` |
| ``leader`` | every replica | elects one leader through Postgres; runs the leader-only services |
| ``purger`` | the leader only | scheduled purge of old rows and of the replay log |
"""
