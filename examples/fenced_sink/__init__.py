"""A fenced resource: an HTTP key-value sink that refuses writes carrying an old fencing token.

This is the "storage service" of Martin Kleppmann's fencing-token argument, small enough to read in a minute.
The examples' jobs and workers write their effects here, and the tests count what it accepted and refused.
Standard library only, so a job can call it from a fresh ``python`` in a few milliseconds.
"""

from .sink import FencedStore, WriteResult, serve, write

__all__ = ["FencedStore", "WriteResult", "serve", "write"]
