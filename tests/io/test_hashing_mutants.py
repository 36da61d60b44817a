"""The background hasher's thread: it never keeps a process alive, and it carries a name a
thread dump shows. Gaps the mutation run of ``io/hashing.py`` found (its other survivors there
were none); the digest checks live in ``test_hashing_edges.py``.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading

from provision.io.hashing import BackgroundHasher
from provision.testing.torrent_fixtures import provision_env

LEFT_OPEN = """
from provision.io.hashing import BackgroundHasher
h = BackgroundHasher()
h.update(b"abc")
print("fed", flush=True)
"""  # the script ends without close() or abandon(): its hasher thread still waits for more


def test_a_hasher_left_open_does_not_keep_the_process_from_exiting() -> None:
    cp = subprocess.run([sys.executable, "-c", LEFT_OPEN], capture_output=True, text=True, timeout=60,
                        env=provision_env())
    assert (cp.returncode, cp.stdout) == (0, "fed\n"), cp.stderr


def test_the_hasher_thread_is_a_daemon_named_hasher_or_as_given() -> None:
    """In-process view of the test above (a subprocess's calls are not traced by mutmut's
    test selection, so this one is what it runs for the constructor)."""
    before = set(threading.enumerate())
    a, b = BackgroundHasher(), BackgroundHasher(name="shard-7")
    try:
        started = sorted((t.name, t.daemon) for t in set(threading.enumerate()) - before)
        assert started == [("hasher", True), ("shard-7", True)]
        a.update(b"abc")
        assert a.hexdigest() == hashlib.sha256(b"abc").hexdigest()
    finally:
        a.abandon()
        b.abandon()
