"""The `kaniko` backend: each build attempt a batch/v1 Job running the Kaniko executor.

- `manifest`: the Job and the executor's arguments (pure)
- `verdict`: what the Job and its Pod say the attempt came to (pure)
- `stages`: the executor's log lines as Step events (pure)
- `backend`: `KanikoBackend`, which creates, follows and cancels the Jobs through
  `worker.kube`
"""

from worker.backends.kaniko.backend import KanikoBackend
from worker.settings import KanikoSettings

__all__ = ["KanikoBackend", "KanikoSettings"]
