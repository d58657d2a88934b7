"""Head profiling: calibrate once per model, classify KV heads, save a versioned JSON profile."""

from heterocache.profiling.api import default_profile_dir, profile_heads
from heterocache.profiling.profile import HeadProfile, HeadRecord, model_fingerprint

__all__ = ["HeadProfile", "HeadRecord", "default_profile_dir", "model_fingerprint", "profile_heads"]
