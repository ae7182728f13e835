"""Class-incremental streams. Importing this package registers every built-in stream in ``cl.registries.STREAMS``."""

from streams import cifar, domainnet, fashion_mnist, folders, image_folder, synthetic  # noqa: F401  (registration)
from streams.base import MissingDatasetError, StreamConfig, register_stream

__all__ = ["StreamConfig", "MissingDatasetError", "register_stream"]
