"""The gateway's HTTP side: the FastAPI app and everything that answers a request.

Routes (``/predict`` and its SSE streams, the Open Inference Protocol's ``/v2``
and its generate extension, Triton's statistics and repository extensions,
``/admin``, ``/health``, ``/metrics``, the status page), the HTTP helpers they
share (:mod:`gateway.api.http`) and API keys; the same protocol over gRPC in
:mod:`gateway.api.grpc`, on the same pools.
Imports point down to :mod:`gateway.pool` and :mod:`shared`, never back.
"""
