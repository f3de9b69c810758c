"""The torchpool worker: one pinned process that loads a model and serves it.

Started as a fresh interpreter, ``python -m worker --connect ENDPOINT ...``
(the flags are :class:`shared.config.WorkerSettings`). Modules, in the order a
worker uses them:

    main       boot sequence: settings, pinning, sockets, load, serve, exit codes
    pinning    CPU affinity, thread counts, CUDA_VISIBLE_DEVICES (before torch)
    control    the thread that owns the control socket: lifecycle and heartbeats
    stats      live memory figures for heartbeats and READY
    loading    every model source -> LoadedModel (demo, handler, export, ...)
    demo       the built-in demo model
    handler    the interface of a user handler class
    codec      request bodies -> tensors, results -> reply bodies
    batching   grouping, concatenating and splitting requests around one forward
    serving    the data-socket loop: collect, batch, forward, reply

Nothing here imports torch at package import time; ``worker.main`` imports the
torch-using modules only after pinning is applied.
"""
