"""tlserve client SDK: a light Python client (grpcio + protobuf only) for the tlserve
transfer-learning service, with one typed method per RPC in a sync `Client` and an
asyncio `AsyncClient`, `TLServeError` for every failed call, and the generated
messages as `pb`; the `tlserve` command line (`client.cli`) is built on it.

    from tlserve.client import Client
    with Client("127.0.0.1:50051") as tl:
        job = tl.fine_tune(dataset="flowers", model_name="flowers", backbone="resnet18")
        for event in tl.watch_job(job.id): print(event.epoch, event.val_accuracy)
        print(tl.predict("flowers", [open("rose.jpg", "rb").read()]).predictions[0].top_k[0].label)
"""

from __future__ import annotations

import importlib.metadata

from tlserve.client._aio import AsyncClient
from tlserve.client._client import Client
from tlserve.client._common import TLS, TLServeError, parse_model_ref
from tlserve.client.tlserve.v1 import tlserve_pb2 as pb

try:
    __version__ = importlib.metadata.version("tlserve")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = ["TLS", "AsyncClient", "Client", "TLServeError", "__version__", "parse_model_ref", "pb"]
