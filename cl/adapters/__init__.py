"""Adapter types. Importing this package registers the built-in types in ``cl.registries.ADAPTERS``."""

from cl.adapters import bottleneck, lora, skills  # noqa: F401  (registration)
from cl.adapters.base import Adapter, AdapterConfig
from cl.adapters.bottleneck import BottleneckAdapter, BottleneckConfig
from cl.adapters.inject import AdaptedSite, adapter_name
from cl.adapters.lora import LoraAdapter, LoraConfig
from cl.adapters.skills import SkillInventoryAdapter, SkillsConfig

__all__ = [
    "Adapter",
    "AdapterConfig",
    "AdaptedSite",
    "BottleneckAdapter",
    "BottleneckConfig",
    "LoraAdapter",
    "LoraConfig",
    "SkillInventoryAdapter",
    "SkillsConfig",
    "adapter_name",
]
