"""``HeadProfile``: per-KV-head roles and budget weights, stored as versioned JSON (DESIGN s.6).

```
{"format": "heterocache.profile/2",
 "model": {"name", "n_layers", "n_kv_heads", "head_dim", "fingerprint", "layer_types", "sliding_window"},
 "settings": {...},
 "heads": [[{"layer", "head", "stability", "labels": [temporal, cluster], "pivot", "weight"}, ...], ...]}
```
``labels[0]`` is ``"anchor"|"volatile"`` (kept for every head), ``labels[1]`` is
``"pivot"|"satellite"|null``. The role is the cluster label when present, else the temporal label
(precedence pivot > satellite > temporal). ``pivot`` is the pivot's head index for a satellite,
null otherwise; ``weight`` is the allocation weight of anchors and satellites, null for the full
heads (volatile, pivot).

Format 2 (hybrid models) adds ``model.layer_types`` (``"full_attention"|"sliding_attention"`` per
layer) and ``model.sliding_window``. Heads of sliding layers are not profiled: their record is
``{"stability": null, "labels": ["sliding", null], "pivot": null, "weight": null}`` (role
``"sliding"``: never full, pivot or satellite; budgets as other methods give them, capped at the
window). A model without sliding layers is still written as format 1 (same content, every layer
full attention); both formats load.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "heterocache.profile/1"
FORMAT_HYBRID = "heterocache.profile/2"
FORMATS = (FORMAT, FORMAT_HYBRID)
FULL, SLIDING = "full_attention", "sliding_attention"
TEMPORAL = ("anchor", "volatile")
CLUSTER = ("pivot", "satellite")
ROLES = ("anchor", "volatile", "pivot", "satellite")
MODEL_KEYS = ("name", "n_layers", "n_kv_heads", "head_dim", "fingerprint")
HEAD_KEYS = ("layer", "head", "stability", "labels", "pivot", "weight")


@dataclass(frozen=True)
class HeadRecord:
    """One KV head: temporal stability ``S_h``, labels, its pivot (satellites), its weight."""

    layer: int
    head: int
    stability: float | None  # None for heads of sliding-window layers (not profiled)
    labels: tuple[str, str | None]
    pivot: int | None = None
    weight: float | None = None

    @property
    def role(self) -> str:
        """``"anchor"|"volatile"|"pivot"|"satellite"``, or ``"sliding"`` for a sliding-window layer's head."""
        return self.labels[1] or self.labels[0]

    @property
    def is_full(self) -> bool:
        """Volatile and pivot heads keep every prompt token."""
        return self.role in ("volatile", "pivot")

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "head": self.head, "stability": self.stability,
                "labels": list(self.labels), "pivot": self.pivot, "weight": self.weight}


@dataclass
class HeadProfile:
    """Roles of every (layer, KV head); ``heads[layer][head]`` is a :class:`HeadRecord`."""

    model: dict[str, Any]
    settings: dict[str, Any]
    heads: list[list[HeadRecord]]
    format: str = field(default=FORMAT)

    def __post_init__(self) -> None:
        if self.model.get("layer_types") and SLIDING in self.model["layer_types"]:
            self.format = FORMAT_HYBRID
        _validate(self, "<HeadProfile>")

    # -- accessors ---------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.heads)

    @property
    def n_kv_heads(self) -> int:
        return len(self.heads[0]) if self.heads else 0

    @property
    def layer_types(self) -> list[str]:
        """``"full_attention"|"sliding_attention"`` per layer (format 1: all full attention)."""
        return list(self.model.get("layer_types") or [FULL] * self.n_layers)

    def layer_windows(self) -> list[int | None]:
        """Sliding window per layer, None for full attention (as ``heterocache.models.layer_windows``)."""
        window = self.model.get("sliding_window")
        return [window if kind == SLIDING else None for kind in self.layer_types]

    def role(self, layer: int, head: int) -> str:
        """``"anchor"|"volatile"|"pivot"|"satellite"`` of one KV head."""
        return self.heads[layer][head].role

    def roles(self) -> list[list[str]]:
        return [[h.role for h in row] for row in self.heads]

    def full_heads(self) -> list[tuple[int, int]]:
        """``(layer, head)`` of the heads kept in full (volatile and pivot)."""
        return [(h.layer, h.head) for row in self.heads for h in row if h.is_full]

    def stars(self, layer: int) -> dict[int, list[int]]:
        """``{pivot head: [satellite heads, ascending]}`` of one layer, keyed by pivot id (ascending)."""
        out = {h.head: [] for h in self.heads[layer] if h.role == "pivot"}
        for h in self.heads[layer]:
            if h.role == "satellite":
                out[h.pivot].append(h.head)
        return out

    def counts(self, layer: int | None = None) -> dict[str, int]:
        """Heads per role, for the whole model or one layer."""
        rows = self.heads if layer is None else [self.heads[layer]]
        out = dict.fromkeys(ROLES + (("sliding",) if SLIDING in self.layer_types else ()), 0)
        for row in rows:
            for h in row:
                out[h.role] += 1
        return out

    def stabilities(self) -> list[list[float]]:
        return [[h.stability for h in row] for row in self.heads]

    def weights(self) -> list[list[float | None]]:
        return [[h.weight for h in row] for row in self.heads]

    # -- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "model": dict(self.model), "settings": dict(self.settings),
                "heads": [[h.to_dict() for h in row] for row in self.heads]}

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> HeadProfile:
        """Build and validate a profile from its JSON object; errors name ``source``."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a profile must be a JSON object, got {type(data).__name__}")
        fmt = data.get("format")
        if fmt is None:
            raise ValueError(f"{source}: not a heterocache profile (no 'format' field; expected {FORMAT!r})")
        if fmt not in FORMATS:
            raise ValueError(f"{source}: unsupported profile format {fmt!r}; this version reads {list(FORMATS)}")
        for key in ("model", "settings", "heads"):
            if key not in data:
                raise ValueError(f"{source}: missing field {key!r}")
        if not isinstance(data["heads"], list) or not all(isinstance(r, list) for r in data["heads"]):
            raise ValueError(f"{source}: 'heads' must be a list (layers) of lists (KV heads)")
        heads = []
        for li, row in enumerate(data["heads"]):
            records = []
            for hi, item in enumerate(row):
                where = f"{source}: heads[{li}][{hi}]"
                if not isinstance(item, dict):
                    raise ValueError(f"{where} must be an object")
                missing = [k for k in HEAD_KEYS if k not in item]
                if missing:
                    raise ValueError(f"{where} is missing field(s) {missing}")
                labels = item["labels"]
                if not isinstance(labels, list) or len(labels) != 2:
                    raise ValueError(f"{where}: 'labels' must be [temporal, cluster], got {labels!r}")
                records.append(HeadRecord(layer=item["layer"], head=item["head"], stability=item["stability"],
                                          labels=(labels[0], labels[1]), pivot=item["pivot"],
                                          weight=item["weight"]))
            heads.append(records)
        profile = cls.__new__(cls)
        profile.model, profile.settings, profile.heads, profile.format = data["model"], data["settings"], heads, fmt
        _validate(profile, source)
        return profile

    def save(self, path: str | Path) -> Path:
        """Write the profile as JSON (parent folders created); returns the path."""
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> HeadProfile:
        """Read and validate a profile JSON file."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"profile file {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"profile file {str(path)!r} is not valid JSON: {err}") from None
        return cls.from_dict(data, source=f"profile file {str(path)!r}")

    def check_model(self, model) -> None:
        """Raise ValueError if this profile was made for a different model (shape or weights)."""
        from heterocache.models import layer_windows, model_geometry

        geometry = model_geometry(model)
        for key in ("n_layers", "n_kv_heads", "head_dim"):
            if geometry[key] != self.model[key]:
                raise ValueError(
                    f"profile was made for another model: {key}={self.model[key]} in the profile "
                    f"({self.model['name']!r}), {geometry[key]} in the given model; profile it with profile_heads()"
                )
        if self.layer_windows() != layer_windows(model):
            raise ValueError(
                f"profile was made for another attention layout: sliding windows {self.layer_windows()} in the "
                f"profile, {layer_windows(model)} in the given model; profile it with profile_heads()"
            )
        fingerprint = model_fingerprint(model)
        if fingerprint != self.model["fingerprint"]:
            raise ValueError(
                f"profile was made for another model: fingerprint {self.model['fingerprint'][:12]}... "
                f"({self.model['name']!r}) differs from the given model's {fingerprint[:12]}... (same shape, "
                "different config or weights); profile it with profile_heads()"
            )


def _validate(profile: HeadProfile, source: str) -> None:
    if profile.format not in FORMATS:
        raise ValueError(f"{source}: unsupported profile format {profile.format!r}; expected one of {list(FORMATS)}")
    model = profile.model
    if not isinstance(model, dict):
        raise ValueError(f"{source}: 'model' must be an object with {list(MODEL_KEYS)}")
    missing = [k for k in MODEL_KEYS if k not in model]
    if missing:
        raise ValueError(f"{source}: 'model' is missing field(s) {missing}")
    for key in ("n_layers", "n_kv_heads", "head_dim"):
        if not isinstance(model[key], int) or isinstance(model[key], bool) or model[key] < 1:
            raise ValueError(f"{source}: model.{key} must be a positive integer, got {model[key]!r}")
    if not isinstance(profile.settings, dict):
        raise ValueError(f"{source}: 'settings' must be an object")
    heads = profile.heads
    if len(heads) != model["n_layers"] or any(len(row) != model["n_kv_heads"] for row in heads):
        shape = [len(row) for row in heads]
        raise ValueError(f"{source}: 'heads' has per-layer lengths {shape}, expected {model['n_layers']} "
                         f"layers x {model['n_kv_heads']} KV heads")
    types = model.get("layer_types")
    if profile.format == FORMAT_HYBRID:
        if types is None:
            raise ValueError(f"{source}: unsupported profile format {profile.format!r} without model.layer_types "
                             "(format 2 records the layer types of hybrid models)")
        if not isinstance(types, list) or len(types) != model["n_layers"] or not set(types) <= {FULL, SLIDING}:
            raise ValueError(f"{source}: model.layer_types must list {FULL!r} or {SLIDING!r} for each of the "
                             f"{model['n_layers']} layers, got {types!r}")
        window = model.get("sliding_window")
        if SLIDING in types and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
            raise ValueError(f"{source}: model.sliding_window must be a positive integer, got {window!r}")
    for li, row in enumerate(heads):
        sliding = profile.format == FORMAT_HYBRID and types[li] == SLIDING
        for hi, h in enumerate(row):
            where = f"{source}: heads[{li}][{hi}]"
            if sliding or h.labels[0] == "sliding":
                if not sliding or h.labels != ("sliding", None) or (h.stability, h.pivot, h.weight) != (None,) * 3:
                    raise ValueError(f"{where}: heads of sliding-window layers (and only those) have labels "
                                     "['sliding', null] and null stability, pivot and weight")
                if (h.layer, h.head) != (li, hi):
                    raise ValueError(f"{where} says layer={h.layer!r}, head={h.head!r}; expected {li}, {hi}")
                continue
            _validate_head(h, li, hi, row, where)
        for h in row:  # after every head is known to be well formed
            if h.role == "pivot" and not any(o.pivot == h.head for o in row):
                raise ValueError(f"{source}: heads[{li}][{h.head}]: pivot head has no satellite")


def _validate_head(h: HeadRecord, layer: int, head: int, row: list[HeadRecord], where: str) -> None:
    if h.layer != layer or h.head != head:
        raise ValueError(f"{where} says layer={h.layer!r}, head={h.head!r}; expected {layer}, {head}")
    if not isinstance(h.stability, (int, float)) or isinstance(h.stability, bool) or not 0 <= h.stability <= 1:
        raise ValueError(f"{where}: stability must be a number in [0, 1], got {h.stability!r}")
    temporal, cluster = h.labels
    if temporal not in TEMPORAL:
        raise ValueError(f"{where}: labels[0] must be one of {list(TEMPORAL)}, got {temporal!r}")
    if cluster is not None and cluster not in CLUSTER:
        raise ValueError(f"{where}: labels[1] must be one of {list(CLUSTER)} or null, got {cluster!r}")
    if cluster == "satellite":
        if not isinstance(h.pivot, int) or not 0 <= h.pivot < len(row) or row[h.pivot].role != "pivot":
            raise ValueError(f"{where}: a satellite's 'pivot' must be the index of a pivot head of the same "
                             f"layer, got {h.pivot!r}")
    elif h.pivot is not None:
        raise ValueError(f"{where}: 'pivot' must be null for a {h.role} head, got {h.pivot!r}")
    if h.is_full:
        if h.weight is not None:
            raise ValueError(f"{where}: 'weight' must be null for a full ({h.role}) head, got {h.weight!r}")
    elif not isinstance(h.weight, (int, float)) or isinstance(h.weight, bool) or not (
            math.isfinite(h.weight) and h.weight > 0):
        raise ValueError(f"{where}: a {h.role} head needs a positive finite 'weight', got {h.weight!r}")


def _rounded(x: float) -> str:
    return f"{x:.4g}"


def model_fingerprint(model) -> str:
    """Stable sha256 over config essentials and a few cheap weight statistics.

    Uses the first, middle and last parameter tensors (name, shape, sum, L2 norm, first 8
    values), rounded to 4 significant digits so fp32/bf16 copies of the same checkpoint usually
    agree. Cheap (three reductions) and independent of the device.
    """
    import torch

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    keys = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps",
            "tie_word_embeddings", "sliding_window")
    essentials: dict[str, Any] = {k: getattr(config, k, None) for k in keys}
    rope = getattr(config, "rope_parameters", None)
    essentials["rope_parameters"] = rope if isinstance(rope, dict) else None
    params = list(model.named_parameters())
    stats = []
    for name, p in (params[0], params[len(params) // 2], params[-1]) if params else ():
        if p.device.type == "meta":
            stats.append([name, list(p.shape)])
            continue
        with torch.no_grad():
            flat = p.detach().reshape(-1)
            total = float(flat.sum(dtype=torch.float64))
            norm = float(torch.linalg.vector_norm(flat, dtype=torch.float64))
            stats.append([name, list(p.shape), _rounded(total), _rounded(norm),
                          [_rounded(float(x)) for x in flat[:8].double().tolist()]])
    blob = json.dumps({"config": essentials, "params": stats}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def model_name(model) -> str:
    """Best-effort human name: the checkpoint path/id, else the config's model type."""
    name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    return Path(name).name if name else str(getattr(model.config, "model_type", "model"))
