"""Model backends behind one async chat interface (:mod:`moa_ray.backends.base`), one descriptor each
(:mod:`moa_ray.backends.registry`)."""

from moa_ray.backends.base import ChatBackend
from moa_ray.backends.registry import BackendDescriptor, create_backend

__all__ = ["BackendDescriptor", "ChatBackend", "create_backend"]
