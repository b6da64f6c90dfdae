"""Two runs side by side, as a Markdown table:
``python -m bench.compare before.json after.json``.

Each cell is the median and, where there is one, the ratio to the direct
baseline of the same run (the figure to compare across runs: absolute
numbers drift with the machine's load).
"""

from __future__ import annotations

import json
import sys

from bench.run import TARGETS


def cell(item: dict | None) -> str:
    if item is None:
        return ""
    value = f"{item['median']:.3g}" if item["median"] < 100 else f"{item['median']:.0f}"
    return f"{value} ({item['ratio']:.3f})" if "ratio" in item else value


def main(argv: list[str] | None = None) -> int:
    paths = (argv if argv is not None else sys.argv[1:])
    if len(paths) < 2:
        print("usage: python -m bench.compare BEFORE.json AFTER.json [MORE.json ...]", file=sys.stderr)
        return 2
    runs = [json.load(open(p)) for p in paths]
    targets = {(t[0], t[1]): t for t in TARGETS}
    header = ["measurement", "metric", *[f"{r['date']}" for r in runs], "target"]
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    names: list[str] = []
    for r in runs:
        names += [n for n in r["results"] if n not in names]
    for name in names:
        metrics: list[str] = []
        for r in runs:
            metrics += [k for k in r["results"].get(name, {}).get("metrics", {}) if k not in metrics]
        for key in metrics:
            if key == "tunnels":
                continue
            cells = [cell(r["results"].get(name, {}).get("metrics", {}).get(key)) for r in runs]
            t = targets.get((name, key))
            goal = "" if t is None else f"{'ratio' if t[2] == 'ratio' else 'value'} {t[3]} {t[4]:g}"
            print(f"| {name} | {key} | " + " | ".join(cells) + f" | {goal} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
