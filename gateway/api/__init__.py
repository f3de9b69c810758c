"""The gateway's HTTP side: the FastAPI app and everything that answers a request.

Routes (``/predict`` and its SSE streams, the Open Inference Protocol's ``/v2``
and its generate extension, ``/admin``, ``/health``, ``/metrics``, the status
page), the HTTP helpers they share (:mod:`gateway.api.http`) and API keys.
Imports point down to :mod:`gateway.pool` and :mod:`shared`, never back.
"""
