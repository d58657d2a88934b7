"""``plot_profile``: one PNG showing every KV head's role and stability."""

from __future__ import annotations

from pathlib import Path

from heterocache.profiling.profile import ROLES, HeadProfile

COLORS = {"anchor": "#4c9f70", "volatile": "#e07a5f", "pivot": "#3d5a80", "satellite": "#98c1d9",
          "sliding": "#cccccc"}
PLOTTED = (*ROLES, "sliding")  # sliding-window layers' heads are not profiled (grey, no stability)


def plot_profile(profile: HeadProfile, path: str | Path) -> Path:
    """Grid of KV heads (rows) x layers (columns) coloured by role; cells show ``S_h``.

    Satellites also show their pivot (``->p``). Returns the written path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    n_layers, n_heads = profile.n_layers, profile.n_kv_heads
    codes = [[PLOTTED.index(profile.role(layer, head)) for layer in range(n_layers)] for head in range(n_heads)]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * n_layers + 1.5), max(2.5, 0.55 * n_heads + 1.6)))
    ax.imshow(codes, cmap=ListedColormap([COLORS[r] for r in PLOTTED]), vmin=-0.5, vmax=len(PLOTTED) - 0.5,
              aspect="auto", interpolation="nearest")
    font = 7 if n_layers <= 40 else 5
    for layer in range(n_layers):
        for head in range(n_heads):
            record = profile.heads[layer][head]
            text = "-" if record.stability is None else f"{record.stability:.2f}"
            if record.role == "satellite":
                text += f"\n->{record.pivot}"
            ax.text(layer, head, text, ha="center", va="center", fontsize=font,
                    color="white" if record.role == "pivot" else "black")
    ax.set_xticks(range(n_layers))
    ax.set_yticks(range(n_heads))
    ax.tick_params(labelsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("KV head")
    counts = profile.counts()
    settings = profile.settings
    ax.set_title(f"{profile.model['name']}: " + ", ".join(f"{counts[r]} {r}" for r in ROLES)
                 + f"  (stable >= {_fmt(settings.get('stable_threshold_value'))},"
                 f" sim >= {_fmt(settings.get('sim_threshold_value'))}, {settings.get('similarity', '?')})",
                 fontsize=9)
    ax.legend(handles=[Patch(color=COLORS[r], label=r) for r in ROLES], loc="upper center",
              bbox_to_anchor=(0.5, -0.18 if n_heads > 2 else -0.35), ncol=4, fontsize=8, frameon=False)
    fig.tight_layout()
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "per layer"
    return "?"
