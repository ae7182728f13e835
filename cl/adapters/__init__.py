"""Adapter types. Importing this package registers the built-in types in ``cl.registries.ADAPTERS``."""

from cl.adapters import attn_adapter, bottleneck, kv_lora, lora, prefix, skills  # noqa: F401  (registration)
from cl.adapters.attn_adapter import AttnAdapter, AttnAdapterConfig
from cl.adapters.base import Adapter, AdapterConfig
from cl.adapters.bottleneck import BottleneckAdapter, BottleneckConfig
from cl.adapters.inject import AdaptedSite, adapter_name
from cl.adapters.kv_lora import KvLoraAdapter, KvLoraConfig
from cl.adapters.lora import LoraAdapter, LoraConfig
from cl.adapters.prefix import PrefixAdapter, PrefixConfig
from cl.adapters.skills import SkillInventoryAdapter, SkillsConfig

__all__ = [
    "Adapter",
    "AdapterConfig",
    "AdaptedSite",
    "AttnAdapter",
    "AttnAdapterConfig",
    "BottleneckAdapter",
    "BottleneckConfig",
    "KvLoraAdapter",
    "KvLoraConfig",
    "LoraAdapter",
    "LoraConfig",
    "PrefixAdapter",
    "PrefixConfig",
    "SkillInventoryAdapter",
    "SkillsConfig",
    "adapter_name",
]
