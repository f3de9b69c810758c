"""Request bodies to tensors and results to reply bodies, one module per wire format.

:mod:`~worker.codec.tensors` holds every tensor conversion,
:mod:`~worker.codec.jsonio` the one JSON parse and write (every route prints
the same numbers) and :mod:`~worker.codec.inputs` the ``Codec`` protocol, the
body-size check and the one input check;
:mod:`~worker.codec.predict` (``/predict`` JSON and msgpack),
:mod:`~worker.codec.v2` (the Open Inference Protocol) and
:mod:`~worker.codec.rawbody` (raw bodies for handlers) only parse their envelopes.
"""
