"""The embedded broker's process lifecycle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.e2e

STARTER = """
import time
from lookalike.shared.bus import TansuBroker
broker = TansuBroker()
print(broker.process.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"  # a zombie waiting for its (dead) parent counts as gone


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_broker_does_not_outlive_a_killed_parent():
    # GIVEN a process that started the embedded broker
    parent = subprocess.Popen([sys.executable, "-c", STARTER], stdout=subprocess.PIPE, text=True)
    broker_pid = int(parent.stdout.readline())
    assert _alive(broker_pid)
    # WHEN that process is killed without a chance to clean up
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    # THEN the broker goes too instead of lingering on its port
    deadline = time.monotonic() + 15
    while _alive(broker_pid):
        assert time.monotonic() < deadline, "broker still running 15 s after its parent was killed"
        time.sleep(0.2)
