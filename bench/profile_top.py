"""Summarise a py-spy ``--format raw`` profile: where the samples are, by thread, own time and inclusive time.

``python bench/profile_top.py bench/results/profile-….txt [--top 25] [--match nbexchange]``
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"^(.*) (\d+)$")
# "function (path/to/file.py:123)" -> "function (file.py)": lines split one function into many rows.
_FRAME = re.compile(r"^(.*) \((?:.*/)?([^/:]+)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    m = _FRAME.match(frame)
    return f"{m.group(1)} ({m.group(2)})" if m else frame


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile", type=Path)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--match", default="", help="inclusive table: only frames whose text contains this")
    args = p.parse_args()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in args.profile.read_text().splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        stack, count = m.group(1).split(";"), int(m.group(2))
        total += count
        frames = [f for f in stack if not f.startswith(("process ", "thread "))]
        thread = next((f for f in stack if f.startswith("thread ")), "?")
        threads[re.sub(r"\(0x[0-9A-Fa-f]+\)", "", thread).strip() or thread] += count
        if frames:
            own[frame_name(frames[-1])] += count
        for name in {frame_name(f) for f in frames}:
            if args.match in name:
                inclusive[name] += count
    print(f"{total} samples")
    print("\nby thread:")
    for name, n in threads.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("\nown time:")
    for name, n in own.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("\ninclusive time:")
    for name, n in inclusive.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
