"""The replay path: claim rows, decide, admit, run targets, write, report.

- ``worker``: the replayer: one pass (express pages, inbox pages, rows of
  other policies, due rows) and the loop that backs off and never dies;
- ``express``: which policies go express, and a pass's express pages (new
  rows decided and replayed inside Postgres);
- ``pages``: one page of the ordinary path: claim, decide, admit, keep within
  a byte budget, apply, commit, report;
- ``lane``: the http leg: leased rows delivered beside the passes, the
  answers recorded in a second transaction;
- ``rows``: the narrow row the daemon holds of a claimed row;
- ``evaluate``: deciding each row (pure; a row's exception parks that row);
- ``admission``: ``max_replays``, recounted under the job's lock slot (rate
  limits and circuits: ``dlqd.throttle``);
- ``targets``: running sql and notify targets in chunks by bytes, bisecting
  failures;
- ``batch``: one transaction's work and its outcome; splitting a batch that
  fails as a whole;
- ``http``: the http target's requests: bodies, deadlines, answers;
- ``report``, ``result``: logs, metrics and circuits after COMMIT only; what
  a pass did;
- ``checks``: validating targets before any replay.
"""
