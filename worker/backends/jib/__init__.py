"""The jib backend: Java projects built into images by Maven's Jib plugin on the worker."""

from worker.backends.jib.backend import JibBackend

__all__ = ["JibBackend"]
