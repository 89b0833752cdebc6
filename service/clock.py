"""The one wall-clock reading the records carry: `now()` as a protobuf Timestamp
(job and model create times, export and profile times, the server's start)."""

from __future__ import annotations

from google.protobuf import timestamp_pb2


def now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp
