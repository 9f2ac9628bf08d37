"""SLHF: serve and train Stackelberg Learning from Human Feedback Leader/Follower models.

One import namespace for the folders of the repository: ``slhf_server`` (``server/``, the FastAPI
service on vLLM), ``slhf_models`` (``models/``: ``slhf_models.serving`` is what the server loads,
the rest trains and evaluates) and ``slhf.cli`` (the ``slhf`` command). The client is the separate
top-level package ``slhf_client``. The layout is described in ``docs/architecture.md``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("slhf")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
