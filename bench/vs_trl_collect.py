"""Build vs_trl.json / vs_trl.md from the per-run result files of a ``bench/vs_trl.py`` run that was cut short.

Each child of ``vs_trl.py`` writes its own ``result-SIDE-NS.json`` into ``--work`` as soon as it finishes; this
script groups the finished ones (data set from the token count, dtype from the recorded compute choice) and writes
the usual table, saying how many runs each row has.

    python bench/vs_trl_collect.py --work /tmp/perf-vs --log vs_trl.log --scale 0.5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import vs_trl  # noqa: E402  (the sibling script)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True)
    p.add_argument("--log", required=True, help="the parent's stderr (its 'rep ...' lines)")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    work = Path(args.work)
    # The parent's log names each finished run in order ("rep R DATA DTYPE SIDE: ..."); the result files, sorted by
    # their nanosecond stamps, are those runs in the same order.
    names = [line.split(":")[0].split()[2:5] for line in Path(args.log).read_text().splitlines()]
    names = [n for n in names if len(n) == 3 and n[0] in vs_trl.DATASETS]
    files = sorted(work.glob("result-*.json"), key=lambda f: int(f.stem.rsplit("-", 1)[1]))
    runs: dict[str, list] = {}
    for (ds, dtype, side), f in zip(names, files, strict=False):
        assert f.stem.split("-")[1] == side, (f, side)
        runs.setdefault(f"{ds}/{dtype}/{side}", []).append(json.loads(f.read_text()))
    results = {k: vs_trl.aggregate(v) for k, v in sorted(runs.items())}
    ns = argparse.Namespace(reps=max(len(v) for v in runs.values()), threads=2, no_passive=False)
    text = vs_trl.markdown(results, vs_trl.machine(), ns, 0.0)
    text = text.replace(
        f"Command: `python bench/vs_trl.py {' '.join(sys.argv[1:])}` (0.0 min).",
        f"Runs per row: {', '.join(f'{k} {len(v)}' for k, v in sorted(runs.items()))}. Collected with "
        f"`python bench/vs_trl_collect.py {' '.join(sys.argv[1:])}` from a `bench/vs_trl.py --scale {args.scale}` "
        f"run ({time.strftime('%Y-%m-%d')}).",
    )
    out = Path(args.out)
    (out / "vs_trl.json").write_text(json.dumps({"results": results, "runs": runs, "scale": args.scale}, indent=2))
    (out / "vs_trl.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
