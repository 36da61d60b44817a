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


def test_the_hasher_thread_is_named_hasher_or_as_given() -> None:
    def hasher_threads() -> set[str]:
        return {t.name for t in threading.enumerate() if t.name in ("hasher", "shard-7")}

    before = hasher_threads()
    a, b = BackgroundHasher(), BackgroundHasher(name="shard-7")
    try:
        assert hasher_threads() - before == {"hasher", "shard-7"}
        a.update(b"abc")
        assert a.hexdigest() == hashlib.sha256(b"abc").hexdigest()
    finally:
        a.abandon()
        b.abandon()
