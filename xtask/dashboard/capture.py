#!/usr/bin/env python3
"""Runs a command in a pseudo-terminal of a given size, as a user's terminal would, renders what
it draws with the `pyte` terminal emulator, and checks that the screen shows the expected words.

    python capture.py --cols 120 --rows 40 --expect loss --expect pref_loss --frame OUT.txt -- CMD...

The frame kept is the last one that shows the most expected words, before the program prints
the --until text (its dashboard has closed by then).
Exit status 0 when one frame shows them all; the frame goes to --frame.
"""

import argparse
import fcntl
import os
import pty
import select
import struct
import sys
import termios
import time

import pyte

ALT_SCREEN = b"\x1b[?1049h"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cols", type=int, default=120)
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--expect", action="append", default=[])
    ap.add_argument("--frame", required=True)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--until", default=None,
                    help="text the program prints once its dashboard has closed: later frames "
                         "are not considered")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd

    screen = pyte.Screen(args.cols, args.rows)
    stream = pyte.ByteStream(screen)
    pid, fd = pty.fork()
    if pid == 0:
        os.environ["TERM"] = "xterm-256color"
        os.execvp(cmd[0], cmd)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", args.rows, args.cols, 0, 0))

    best, best_score = None, -1
    closed = False
    seen = b""
    start = time.time()
    while time.time() - start < args.timeout:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if fd in ready:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            # pyte has no alternate screen: entering it starts from a blank screen, as
            # terminals do.
            for i, part in enumerate(data.split(ALT_SCREEN)):
                if i > 0:
                    screen.reset()
                stream.feed(part)
            seen = (seen + data)[-65536:]
            if args.until and args.until.encode() in seen:
                closed = True
            if closed:
                continue
            text = "\n".join(line.rstrip() for line in screen.display)
            score = sum(word in text for word in args.expect)
            if score >= best_score and text.strip():
                best, best_score = text, score
    _, status = os.waitpid(pid, 0)
    with open(args.frame, "w") as f:
        f.write((best or "") + "\n")
    missing = [w for w in args.expect if best is None or w not in best]
    code = os.waitstatus_to_exitcode(status)
    print(f"dashboard: exit {code}, {len(args.expect) - len(missing)} of {len(args.expect)} "
          f"expected words drawn" + (f"; missing {missing}" if missing else ""))
    return 0 if not missing and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
