"""Avalanche (avalanche-lib 0.6) bridge: clsim strategies as Avalanche strategies, stream converters, metrics.

The only package of clsim that imports Avalanche; import it explicitly (``import cl`` never does).

- :class:`ClsimStrategy` is a ``SupervisedTemplate`` that drives the *same* clsim strategy code through a
  :class:`cl.loop.Session`: each training experience becomes a clsim :class:`~cl.types.Task` and runs the strategy's
  whole routine (``before_task`` -> every phase -> ``after_task``), seeded exactly like ``clsim run``. Avalanche keeps
  the stream, evaluation, plugins, loggers and checkpoints.
- :func:`avalanche_to_stream` / :func:`stream_to_avalanche` convert benchmarks and streams.
- :class:`ExpansionMetric` / :class:`TaskRetrievalMetric` report clsim statistics as Avalanche ``PluginMetric``s.
- Checkpoints: ``avalanche.checkpointing.save_checkpoint`` / ``maybe_load_checkpoint`` work on a ClsimStrategy as
  they are (no ``dill`` settings needed): the clsim session pickles as its own task-boundary checkpoint (structure,
  adapters, heads, strategy state incl. indexes) and is rebuilt on load; the frozen backbone is recreated from the
  config and checked against a fingerprint. :func:`save_clsim_checkpoint` / :func:`load_clsim_checkpoint` wrap them.

Layout: ``data.py`` (converters and their datasets), ``strategy.py`` (:class:`ClsimStrategy`, plugin checks),
``session.py`` (the session box and checkpoints), ``metrics.py`` (the plugin metrics).
"""

from cl.integrations.avalanche.data import avalanche_to_stream, stream_to_avalanche
from cl.integrations.avalanche.metrics import ExpansionMetric, TaskRetrievalMetric
from cl.integrations.avalanche.session import load_clsim_checkpoint, save_clsim_checkpoint
from cl.integrations.avalanche.strategy import ClsimStrategy, IgnoredPluginWarning, RandomBackboneWarning

# checkpoints written before the split pickled these under their old path (cl.integrations.avalanche.<name>)
from cl.integrations.avalanche.data import AvalancheView as AvalancheView  # isort: skip
from cl.integrations.avalanche.data import _Fetch as _Fetch  # isort: skip
from cl.integrations.avalanche.data import _Indices as _Indices  # isort: skip
from cl.integrations.avalanche.session import _SessionBox as _SessionBox  # isort: skip

__all__ = ["ClsimStrategy", "avalanche_to_stream", "stream_to_avalanche", "ExpansionMetric", "TaskRetrievalMetric",
           "save_clsim_checkpoint", "load_clsim_checkpoint", "IgnoredPluginWarning", "RandomBackboneWarning"]
