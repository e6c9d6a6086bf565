"""libfuse's threads as Python sees them: a real mount served in a child
process, whose callbacks record whether what a thread left in a
threading.local in one callback is still there in its next (the thread's
Python state kept, not made and deleted around every call)."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="needs /dev/fuse and root")

SERVER = textwrap.dedent("""
    import json, os, sys, threading
    from mountd.cache.blocks import BlockCache
    from mountd.config.settings import CacheSettings
    from mountd.fs import fuse_ops
    from mountd.fs.core import FileSystemCore
    from mountd.storage.local import LocalStore

    data, mountpoint, report = sys.argv[1:4]
    cfg = CacheSettings(attribute_ttl=0, negative_ttl=0, disk=False)
    core = FileSystemCore(LocalStore(data), cfg, BlockCache(cfg.memory, None, cfg.threads, cfg.block_size))
    seen = threading.local()
    calls = {"calls": 0, "found": 0}
    getattr_ = core.getattr

    def getattr_recording(path):
        calls["calls"] += 1
        calls["found"] += getattr(seen, "mark", False)
        seen.mark = True
        return getattr_(path)
    core.getattr = getattr_recording
    try:
        fuse_ops.serve(core, mountpoint, "threads-test", on_ready=lambda: open(report + ".ready", "w").close())
    finally:
        with open(report, "w") as f:
            json.dump(calls, f)
""")


def test_a_libfuse_thread_keeps_its_python_state_from_one_callback_to_the_next(tmp_path):
    data, mp, report = tmp_path / "data", tmp_path / "mnt", tmp_path / "report.json"
    data.mkdir()
    mp.mkdir()
    (data / "f").write_bytes(b"x")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(data), str(mp), str(report)], cwd=root,
                              env={**os.environ, "PYTHONPATH": root}, stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            if os.path.exists(str(report) + ".ready") or server.poll() is not None:
                break
            time.sleep(0.05)
        assert os.path.ismount(mp), server.stderr.read().decode() if server.poll() is not None else "not mounted"
        for _ in range(200):  # attribute_ttl=0: every stat is a callback
            os.stat(mp / "f")
    finally:
        subprocess.run(["fusermount3", "-u", str(mp)], check=False)
        server.wait(30)
    calls = json.loads(report.read_text())
    assert calls["calls"] >= 200
    # libfuse runs at most 10 threads: all but each one's first callback find their mark
    assert calls["found"] >= calls["calls"] - 10, calls
