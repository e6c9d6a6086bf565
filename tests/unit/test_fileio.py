"""Local files written whole or not at all (mountd.fileio): invisible until
finished, exact bytes whatever the alignment of the pieces, direct I/O and
its fallbacks, nothing left behind when abandoned; small files replaced in
one step (write_atomic)."""

import ctypes
import errno
import os
import threading

import pytest

import mountd.fileio as fileio
from mountd.fileio import ALIGN, NewFile, aligned_buffer, replacing, write_atomic

MiB = 1024 * 1024


@pytest.fixture(params=["unnamed", "temporary name"])
def naming(request, monkeypatch):
    """Both ways a file is kept out of sight: O_TMPFILE, and (where /proc or
    O_TMPFILE is missing) a hidden temporary name."""
    if request.param == "temporary name":
        monkeypatch.setattr(fileio, "_HAVE_PROC", False)
    return request.param


def _listing(directory):
    return sorted(os.listdir(directory))


def _address(buf) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def test_aligned_buffer_is_page_aligned_and_rounded_up():
    buf = aligned_buffer(10_000)
    assert _address(buf) % ALIGN == 0 and len(buf) == 3 * ALIGN


@pytest.mark.parametrize("direct", [True, False])
def test_file_appears_only_when_finished_with_exact_bytes(tmp_path, naming, direct):
    data = os.urandom(3 * MiB + 4097)
    buf = aligned_buffer(len(data))
    buf[:len(data)] = data
    view = memoryview(buf)[:len(data)]
    final = tmp_path / "out.bin"
    new = NewFile(str(final), direct=direct)
    # unaligned starts and ends, an aligned middle, out of order
    cuts = [0, 5000, 5000 + 3 * ALIGN + 7, 2 * MiB, len(data)]
    for lo, hi in reversed(list(zip(cuts, cuts[1:]))):
        new.pwrite(view[lo:hi], lo)
    assert not final.exists()
    if naming == "unnamed":
        assert _listing(tmp_path) == []
    else:
        assert all(name.startswith(".out.bin.") and name.endswith(".partial") for name in _listing(tmp_path))
    assert new.size() == len(data)
    new.finish(mtime=1_000_000_000)
    assert final.read_bytes() == data
    assert os.stat(final).st_mtime == 1_000_000_000
    assert _listing(tmp_path) == ["out.bin"]


def test_concurrent_writers_of_disjoint_ranges(tmp_path, naming):
    data = os.urandom(8 * MiB + 123)
    buf = aligned_buffer(len(data))
    buf[:len(data)] = data
    view = memoryview(buf)[:len(data)]
    new = NewFile(str(tmp_path / "f"), direct=True)
    step = 999_999  # pieces that straddle page boundaries
    threads = [threading.Thread(target=new.pwrite, args=(view[lo:lo + step], lo))
               for lo in range(0, len(data), step)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    new.finish()
    assert (tmp_path / "f").read_bytes() == data


def test_chunks_read_back_what_was_written(tmp_path, naming):
    data = os.urandom(MiB + 17)
    new = NewFile(str(tmp_path / "f"), direct=True)
    new.pwrite(data, 0)
    assert b"".join(bytes(c) for c in new.chunks(memoryview(bytearray(64 * 1024)))) == data
    new.discard()


def test_discard_leaves_nothing(tmp_path, naming):
    new = NewFile(str(tmp_path / "f"), direct=True)
    new.pwrite(os.urandom(2 * MiB), 0)
    new.discard()
    assert _listing(tmp_path) == []


def test_overwrite_rules(tmp_path, naming):
    final = tmp_path / "f"
    final.write_bytes(b"old")
    keep = NewFile(str(final))
    keep.pwrite(b"new", 0)
    with pytest.raises(FileExistsError):
        keep.finish(overwrite=False)
    assert final.read_bytes() == b"old" and _listing(tmp_path) == ["f"]
    replace = NewFile(str(final))
    replace.pwrite(b"new", 0)
    replace.finish(overwrite=True)
    assert final.read_bytes() == b"new" and _listing(tmp_path) == ["f"]


def test_read_only_bytes_are_written_through_the_page_cache(tmp_path):
    new = NewFile(str(tmp_path / "f"), direct=True)
    data = os.urandom(3 * ALIGN)  # bytes: no address to align, so never direct
    new.pwrite(data, 0)
    new.finish()
    assert (tmp_path / "f").read_bytes() == data


def test_a_filesystem_without_direct_io_still_gets_the_file(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)
    monkeypatch.setattr(os, "open", no_direct)
    new = NewFile(str(tmp_path / "f"), direct=True)
    assert not new.direct
    buf = aligned_buffer(MiB)
    new.pwrite(memoryview(buf), 0)
    new.finish()
    assert (tmp_path / "f").read_bytes() == bytes(MiB)


def test_reserve_allocates_without_changing_the_size(tmp_path):
    new = NewFile(str(tmp_path / "f"), direct=True)
    new.reserve(16 * MiB)
    st = os.fstat(new.fd)
    assert st.st_size == 0 and st.st_blocks * 512 >= 16 * MiB
    new.discard()


def test_reserve_reports_a_full_disk(tmp_path, monkeypatch):
    def full(fd, mode, offset, length):
        ctypes.set_errno(errno.ENOSPC)
        return -1
    monkeypatch.setattr(fileio, "_fallocate", full)
    new = NewFile(str(tmp_path / "f"))
    with pytest.raises(OSError) as e:
        new.reserve(MiB)
    assert e.value.errno == errno.ENOSPC
    new.discard()
    assert _listing(tmp_path) == []


def test_reserve_where_unsupported_is_a_no_op(tmp_path, monkeypatch):
    def unsupported(fd, mode, offset, length):
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1
    monkeypatch.setattr(fileio, "_fallocate", unsupported)
    new = NewFile(str(tmp_path / "f"))
    new.reserve(MiB)
    new.pwrite(b"x", 0)
    new.finish()
    assert (tmp_path / "f").read_bytes() == b"x"


def test_write_atomic_replaces_with_the_mode_asked_for(tmp_path):
    path = tmp_path / "record.json"
    path.write_bytes(b"old")
    old_umask = os.umask(0o077)  # the mode is the caller's, not the umask's
    try:
        write_atomic(str(path), b"new", mode=0o644, durable=True)
    finally:
        os.umask(old_umask)
    assert path.read_bytes() == b"new" and oct(os.stat(path).st_mode & 0o777) == "0o644"
    assert _listing(tmp_path) == ["record.json"]


def test_replacing_leaves_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "workspace.yaml"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with replacing(str(path)) as f:
            f.write(b"half")
            raise RuntimeError("writer failed")
    assert path.read_bytes() == b"old" and _listing(tmp_path) == ["workspace.yaml"]
