"""The learner's contents manager: a notebook opened and not touched stays unchanged.

When a notebook's kernel connects, JupyterLab writes the kernel's ``language_info`` (name,
version, mimetype, ...) into the notebook's metadata, and a notebook whose stored
``language_info`` differs is marked as changed: a learner who only opened a lecture is asked to
save it. The released notebooks store only ``{"name": "python"}`` (the Python version belongs to
the learner's machine, not to the course; a release must be the same on every machine), so this
manager fills in, when a notebook is read, what this server's Python kernel will report: the same
interpreter runs the server and the kernel (``jupyter/lab.py``). Only the copy sent to the browser
changes; nothing is written to disk until the learner saves.
"""

from __future__ import annotations

from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager


def kernel_language_info() -> dict:
    """What ipykernel reports as ``language_info`` in this interpreter."""
    from ipykernel.ipkernel import IPythonKernel

    return dict(IPythonKernel.language_info)


class LearnerContentsManager(AsyncLargeFileManager):
    async def get(self, path, content=True, type=None, format=None, **kwargs):  # noqa: A002 - the base's names
        model = await super().get(path, content=content, type=type, format=format, **kwargs)
        if content and model.get("type") == "notebook" and model.get("content") is not None:
            meta = model["content"].setdefault("metadata", {})
            info = meta.get("language_info") or {}
            if info.get("name", "python") == "python":
                meta["language_info"] = {**info, **kernel_language_info()}
        return model
