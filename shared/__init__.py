"""What the gateway and the workers both import: wire protocol, settings, errors.

    protocol     the wire: message types, frames, limits, the constants both sides use
    config       every flag, typed and validated; modelconfig, modelfile: the config file
    errors       torchpool's exceptions and their HTTP statuses
    media        media types and content codings, read alike on both sides
    devices      which GPUs a process sees and what cuda:N names
    fingerprint  what makes two workers interchangeable; heap: a small helper

Small and dependency-light on purpose: no torch, no FastAPI.
"""
