"""The replay path: claim rows, decide, admit, run targets, write, report.

| module | owns |
| --- | --- |
| ``rows`` | the narrow row the daemon holds of a claimed row |
| ``evaluate`` | deciding each row (pure; a row's exception parks that row) |
| ``admission`` | rate limits, circuit breakers, max_replays |
| ``targets`` | running sql/notify targets, bisecting failures |
| ``batch`` | one transaction's work; splitting a batch that fails as a whole |
| ``report`` | logs, metrics and circuits, after COMMIT only |
| ``worker`` | the claiming loop |
| ``checks`` | validating targets before any replay |
"""
