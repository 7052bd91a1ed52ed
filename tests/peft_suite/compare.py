"""Compare two junit XML files of the same PEFT test run: unpatched vs patched.

Prints the counts of each and every test that passed unpatched but failed/errored patched
(a *new* failure), with the first line of its message. Exit status 1 if there is any.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def outcomes(path: str) -> dict[str, tuple[str, str]]:
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        tid = f"{case.get('classname')}::{case.get('name')}"
        status, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                status, msg = tag, (el.get("message") or "").splitlines()[0:1]
                msg = msg[0] if msg else ""
                break
        out[tid] = (status, msg)
    return out


def main(unpatched: str, patched: str) -> int:
    base, ours = outcomes(unpatched), outcomes(patched)
    for name, res in (("unpatched", base), ("patched", ours)):
        counts = {}
        for status, _ in res.values():
            counts[status] = counts.get(status, 0) + 1
        print(f"{name}: {len(res)} tests {dict(sorted(counts.items()))}")
    new = [(t, ours[t]) for t, (s, _) in base.items()
           if s == "passed" and t in ours and ours[t][0] in ("failure", "error")]
    missing = [t for t in base if t not in ours]
    print(f"new failures (pass unpatched, fail patched): {len(new)}; missing from patched: "
          f"{len(missing)}")
    for t, (s, m) in new:
        print(f"  {s}: {t}: {m[:200]}")
    return 1 if new or missing else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
