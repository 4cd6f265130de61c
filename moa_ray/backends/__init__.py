"""Model backends behind one async chat interface (see :mod:`moa_ray.backends.base`)."""

from moa_ray.backends.base import ChatBackend, create_backend

__all__ = ["ChatBackend", "create_backend"]
