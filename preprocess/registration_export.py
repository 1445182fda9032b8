"""Former home of :func:`write_registered_ome`; it lives in :mod:`preprocess.registration.export` now."""

from preprocess.registration.export import write_registered_ome

__all__ = ["write_registered_ome"]
