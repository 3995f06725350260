"""The `tekton` backend: each build attempt a `tekton.dev/v1` TaskRun running the Kaniko
executor (or a configured Task).

- `taskrun`: the TaskRun as read, and the params and result it shares with its Task (pure)
- `manifest`: the TaskRun of an attempt (pure)
- `verdict`: what the TaskRun came to, and its steps as Step events (pure)
- `backend`: `TektonBackend`, which creates, follows and cancels TaskRuns through
  `worker.kube`
"""

from worker.backends.tekton.backend import TektonBackend
from worker.settings import TektonSettings

__all__ = ["TektonBackend", "TektonSettings"]
