"""The embedded broker dies under a running stack.

Tansu keeps topics and offsets in memory only, so a stack whose broker died cannot go
on: `lookalike up` says so and exits non-zero (a process supervisor restarts it). That a
restarted stack and a re-sent catalogue then converge is what
tests/faults/test_crash_recovery.py proves.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.faults.test_crash_recovery import env_for, start_up, wait

pytestmark = pytest.mark.e2e


def test_lookalike_up_exits_with_a_reason_when_its_broker_dies(tmp_path):
    env = env_for(tmp_path / "data")
    with open(tmp_path / "up.err", "wb") as err:
        up = start_up(env, stderr=err)
        try:
            children = subprocess.run(["pgrep", "-P", str(up.pid)], capture_output=True, text=True).stdout.split()
            brokers = [pid for pid in children if b"tansu" in Path(f"/proc/{pid}/cmdline").read_bytes()]
            assert len(brokers) == 1, children
            # WHEN the broker is killed -9
            os.kill(int(brokers[0]), signal.SIGKILL)
            # THEN `lookalike up` exits non-zero within seconds, saying what happened and what to do
            wait(lambda: up.poll() is not None, 30, "lookalike up to exit")
        finally:
            if up.poll() is None:
                up.kill()
            up.wait(30)
    assert up.returncode != 0
    message = (tmp_path / "up.err").read_text()
    assert "the embedded broker exited" in message and "lookalike index" in message
