"""Regenerate the method table in README.md from the method registry.

    python scripts/methods_table.py          # rewrite README.md in place
    python scripts/methods_table.py --check  # exit 1 if README.md is out of date
"""

from __future__ import annotations

import sys
from pathlib import Path

from prunekit.methods import get_method_info, list_methods

START, END = "<!-- methods-table:start -->", "<!-- methods-table:end -->"


def table() -> str:
    yes = lambda b: "yes" if b else ""
    lines = [
        "| method | family | granularity | data | labels | grad | 2nd order | trajectory | description |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted(list_methods(), key=lambda n: (get_method_info(n).family, n)):
        i = get_method_info(name)
        extra = f" (needs `{i.requires}`)" if i.requires else ""
        desc = i.description.replace("|", "\\|")  # a bare pipe would split the table cell
        lines.append(
            f"| `{name}` | {i.family} | {i.granularity} | {yes(i.needs_data)} | {yes(i.needs_labels)} | "
            f"{yes(i.needs_grad)} | {yes(i.needs_second_order)} | {yes(i.needs_trajectory)} | {desc}{extra} |"
        )
    return "\n".join(lines)


def main() -> int:
    readme = Path(__file__).resolve().parent.parent / "README.md"
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{table()}\n{END}{tail}"
    if "--check" in sys.argv:
        return 0 if new == text else 1
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
