"""Replace one marked section of BENCHMARKS.md, leaving every other section (owned by others) alone."""

from __future__ import annotations

from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def update_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Write ``body`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path``.

    Args:
        name: section marker name (e.g. ``"accuracy"``, ``"latency"``).
        body: markdown text for the section (its own heading included).
        path: the markdown file; created when absent, and the section appended when not yet marked.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
