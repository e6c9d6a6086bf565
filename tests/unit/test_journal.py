"""The upload journal and resume, over a local datastore: jobs are durable,
confirmed files are not sent again, a job ends only when storage holds
everything, secrets never reach the journal, missing files keep the job."""

import fcntl
import json
import os

import pytest
import yaml

from mountd.config import datastores
from mountd.journal import Journal, datastore_record, in_use
from mountd.transfer.resume import job_datastore, resume


@pytest.fixture
def local_store(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    cfg = datastores.parse("out", {"type": "local", "root": str(root)}, "test")
    return cfg, root


def outputs(tmp_path, n=5):
    src = tmp_path / "outputs"
    src.mkdir()
    files = []
    for i in range(n):
        p = src / f"f{i}.bin"
        p.write_bytes(os.urandom(100 + i))
        files.append((str(p), f"run/f{i}.bin"))
    return files


def test_a_job_is_on_disk_before_anything_is_uploaded(tmp_path, local_store):
    cfg, _ = local_store
    files = outputs(tmp_path)
    job = Journal(tmp_path / "work").add(datastore_record(cfg), files, ["run/empty"], origin="upload ref x",
                                         run_id="r1")
    body = json.loads(open(job.path).read())
    assert body["files"] == [list(p) for p in files] and body["dirs"] == ["run/empty"]
    assert oct(os.stat(job.path).st_mode & 0o777) == "0o600"
    assert not [n for n in os.listdir(os.path.dirname(job.path)) if n.endswith(".tmp")]
    (pending,) = Journal(tmp_path / "work").pending()
    assert pending.id == job.id and pending.files == files and pending.remaining() == files
    assert Journal(tmp_path / "work").pending(run_id="other") == []


def test_resume_uploads_only_what_is_not_confirmed_and_then_forgets_the_job(tmp_path, local_store):
    cfg, root = local_store
    files = outputs(tmp_path)
    journal = Journal(tmp_path / "work")
    job = journal.add(datastore_record(cfg), files, ["run/empty"], overwrite=False)
    job.confirm(files[0][1])  # as if uploaded before a crash; storage does not have it: proves it is skipped
    report = resume(str(tmp_path / "work"))
    assert report.jobs == 1 and report.finished == 1 and report.files == 4 and not report.failed
    assert sorted(os.listdir(root / "run")) == ["empty", "f1.bin", "f2.bin", "f3.bin", "f4.bin"]
    for local, remote in files[1:]:
        assert (root / remote).read_bytes() == open(local, "rb").read()
    assert journal.pending() == []
    assert all(os.path.exists(local) for local, _ in files)  # outputs are never deleted


def test_a_torn_last_line_of_done_is_not_taken_as_confirmed(tmp_path, local_store):
    cfg, _ = local_store
    files = outputs(tmp_path, 2)
    job = Journal(tmp_path / "work").add(datastore_record(cfg), files)
    with open(job.done_path, "w") as f:
        f.write(files[0][1] + "\n" + files[1][1][:3])  # crash in the middle of a line
    assert job.remaining() == [files[1]]


def test_missing_local_file_is_dropped_and_the_rest_uploaded(tmp_path, local_store):
    # No retry can upload a file that is gone: a job kept for it would make
    # every resume fail (exit 3) forever.
    cfg, root = local_store
    files = outputs(tmp_path, 3)
    journal = Journal(tmp_path / "work")
    journal.add(datastore_record(cfg), files)
    os.unlink(files[1][0])
    report = resume(str(tmp_path / "work"))
    assert report.finished == 1 and report.dropped == [files[1][1]]
    assert [f for f, _ in report.failed] == [files[1][0]]  # this resume fails: an output is lost
    assert "1 dropped (local file gone)" in report.summary()
    assert not journal.pending()
    assert (root / files[0][1]).exists() and (root / files[2][1]).exists()


def test_storage_failure_keeps_the_job(tmp_path):
    cfg = datastores.parse("gone", {"type": "local", "root": str(tmp_path / "no-such-root")}, "test")
    files = outputs(tmp_path, 2)
    journal = Journal(tmp_path / "work")
    journal.add(datastore_record(cfg), files)
    report = resume(str(tmp_path / "work"))
    assert report.failed and report.finished == 0
    assert len(journal.pending()) == 1


def test_staged_copies_are_deleted_after_upload_but_not_while_a_mount_holds_them(tmp_path, local_store):
    cfg, root = local_store
    staging = tmp_path / "work" / "staged"
    staging.mkdir(parents=True)
    copy = staging / "abc"
    copy.write_bytes(b"written through a mount")
    journal = Journal(tmp_path / "work")
    job = journal.add(datastore_record(cfg), [(str(copy), "ckpt.bin")], staged=True)
    with open(staging / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert in_use(job)
        assert resume(str(tmp_path / "work")).jobs == 0
        assert copy.exists() and not (root / "ckpt.bin").exists()
    assert not in_use(job)
    assert resume(str(tmp_path / "work")).finished == 1
    assert (root / "ckpt.bin").read_bytes() == b"written through a mount" and not copy.exists()


def test_an_inline_secret_never_reaches_the_journal_and_is_read_again_from_its_file(tmp_path):
    secret = "c2VjcmV0LWtleS1ub3QtZm9yLXRoZS1qb3VybmFs"
    raw = {"type": "azure_blob", "account_name": "acct", "container_name": "data",
           "credential": {"account_key": secret}}
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"inl": raw}}))
    ws.chmod(0o600)
    cfg = datastores.parse("inl", raw, "test")
    job = Journal(tmp_path / "work").add(datastore_record(cfg, {"workspace": str(ws)}), [])
    assert secret not in open(job.path).read()
    again = job_datastore(job)
    assert again.credential == {"account_key": secret} and again.container_name == "data"


def test_a_referenced_credential_is_kept_as_a_reference(tmp_path):
    raw = {"type": "azure_blob", "account_name": "acct", "container_name": "data",
           "credential": {"account_key_env": "MY_KEY"}}
    cfg = datastores.parse("ref", raw, "test")
    job = Journal(tmp_path / "work").add(datastore_record(cfg), [])
    assert job_datastore(job).credential == {"account_key_env": "MY_KEY"}


def test_resume_command_errors(tmp_path, mountd_cli, monkeypatch):
    r = mountd_cli("resume", "--work-dir", tmp_path / "nope")
    assert r.code == 2 and r.err.startswith("mountd: error: work dir") and "does not exist" in r.err
    monkeypatch.chdir(tmp_path)  # (restored after: later tests' processes must not start from here)
    r = mountd_cli("resume")
    assert r.code == 0 and "no pending uploads" in r.out
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    r = mountd_cli("resume", "--work-dir", tmp_path / "a", "--work-dir", tmp_path / "b")
    assert r.code == 0 and r.out.count("no pending uploads") == 2, r  # every dir asked about is answered
