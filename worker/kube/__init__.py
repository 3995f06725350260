"""The Kubernetes API as the backends use it (kaniko, tekton).

- `errors`: what can go wrong, as types, and what each means for a build (pure)
- `objects`: typed views of the objects read, resources, watch events (pure)
- `api`: `KubeApi`, typed verbs; the only importer of kubernetes_asyncio
- `watch`: `list_watch`, a list+watch that lasts, as an async generator; `merge`
"""
