"""The lab's console: allocate a pty, publish the slave's path, copy what is written to
it into a log file. systemd as PID 1 logs to /dev/console only if it is a tty, so a
FIFO or a plain file would not do; inner.sh binds the slave onto /dev/console.

usage: console_logger.py LOGFILE PATHFILE PIDFILE
"""

import os
import signal
import sys
import tty

log, pathfile, pidfile = sys.argv[1:4]
master, slave = os.openpty()
tty.setraw(slave)  # no \n -> \r\n translation, no echo
with open(pidfile, "w") as f:
    f.write(f"{os.getpid()}\n")
with open(pathfile + ".tmp", "w") as f:
    f.write(os.ttyname(slave))
os.rename(pathfile + ".tmp", pathfile)
out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def on_term(*_: object) -> None:
    # the interrupted read is retried (PEP 475), now non-blocking: it drains what is
    # left, then raises BlockingIOError and we exit
    os.set_blocking(master, False)


signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGINT, on_term)
# `slave` stays open here, so reads never fail with EIO between systemd's opens
while True:
    try:
        data = os.read(master, 65536)
    except BlockingIOError:
        break
    except InterruptedError:
        continue
    except OSError:
        break
    if not data:
        break
    os.write(out, data)
