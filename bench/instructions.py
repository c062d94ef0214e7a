"""Instructions per message on the accepting path, counted by valgrind's callgrind: repeatable to
a fraction of a percent whatever else the machine is doing, so a change to the hot path can be
judged without the noise of timings (a measurement aid, not a benchmark against a peer).

Runs ``session_cpu.py`` (real SmtpSession objects of a started Server, a fake transport) under
callgrind twice, with a few and with many messages, and prints the difference per message: the
event loop thread's instructions and every thread's (the queue writer's included). Start-up cost
cancels out; the modules are compiled first so that neither run pays for it.

    .venv/bin/python bench/instructions.py                  # 100 and 600 messages
    .venv/bin/python bench/instructions.py --tree /tmp/old  # another checkout's src/ and bench/
    .venv/bin/python bench/instructions.py --reuse          # many messages per session

Needs valgrind (Debian package ``valgrind``). Instructions are not time: a change that saves
instructions but adds cache misses or system calls shows only in ``accept.py``.
"""

from __future__ import annotations

import argparse
import compileall
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def totals(out: str) -> list[int]:
    """Instructions per thread file of one callgrind run (thread 1 first)."""
    counts = []
    for path in sorted(glob.glob(out + "-*")):
        with open(path) as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    counts.append(int(line.split()[1]))
                    break
    return counts


def run(tree: Path, messages: int, work: str, reuse: bool = False) -> tuple[int, int]:
    out = os.path.join(work, f"cg{messages}.out")
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    cmd = ["valgrind", "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={out}",
           sys.executable, str(tree / "bench" / "session_cpu.py"), "--messages", str(messages),
           "--rounds", "1", *(["--reuse"] if reuse else [])]
    r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"valgrind failed ({r.returncode}):\n{r.stderr[-2000:]}")
    counts = totals(out)
    if not counts:
        raise SystemExit("callgrind wrote no totals")
    return counts[0], sum(counts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", type=Path, default=HERE.parent, help="checkout whose src/ and bench/ to measure")
    ap.add_argument("--few", type=int, default=100, help="messages in the first run (default 100)")
    ap.add_argument("--many", type=int, default=600, help="messages in the second run (default 600)")
    ap.add_argument("--reuse", action="store_true",
                    help="many messages per session (smtp-source -d); the difference to the default is per connection")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    if args.many <= args.few:
        raise SystemExit("--many must be more than --few")
    tree = args.tree.resolve()
    compileall.compile_dir(str(tree / "src"), quiet=1)
    with tempfile.TemporaryDirectory(prefix="relaywarden-cg-") as work:
        main_a, all_a = run(tree, args.few, work, args.reuse)
        main_b, all_b = run(tree, args.many, work, args.reuse)
    n = args.many - args.few
    print(f"{tree}{' (--reuse)' if args.reuse else ''}: instructions per message: event loop thread {(main_b - main_a) // n:,}, "
          f"all threads {(all_b - all_a) // n:,}")


if __name__ == "__main__":
    main()
