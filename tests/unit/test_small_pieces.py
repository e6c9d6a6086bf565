"""Pure helpers: path rules, secret redaction, retry backoff, progress."""

import io

import pytest

from mountd.errors import UsageError
from mountd.paths import is_within, join, normalize_path
from mountd.redact import redact
from mountd.storage.retry import MAX_RETRY_AFTER
from mountd.storage.sdk import BackoffRetry
from mountd.transfer.download import UnsafeName, local_path_for
from mountd.transfer.progress import Progress, TransferReport, human_size

KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@pytest.mark.parametrize("raw, expected", [
    (None, ""), ("", ""), ("/", ""), ("a/b/", "a/b"), ("/a//b/./c", "a/b/c"), ("a\\b", "a/b"),
])
def test_normalize_path(raw, expected):
    assert normalize_path(raw) == expected


def test_normalize_refuses_dotdot():
    with pytest.raises(UsageError):
        normalize_path("a/../../etc")


def test_join_skips_empty():
    assert join("", "a/", "/b", "") == "a/b"


@pytest.mark.parametrize("path, root, inside", [
    ("a/b", "a", True), ("a", "a", True), ("ab", "a", False), ("a", "a/b", False), ("a/b", "", True),
    ("", "", True), ("/x/y", "/x", True), ("/x/y", "/x/", True), ("/xy", "/x", False), ("/x", "/", True),
])
def test_is_within_takes_store_and_absolute_paths(path, root, inside):
    assert is_within(path, root) is inside


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/etc/passwd", "a\\..\\b", "a//b", "./a", "a/\0"])
def test_local_path_for_refuses_escapes(name, tmp_path):
    with pytest.raises(UnsafeName):
        local_path_for(str(tmp_path), name)


def test_local_path_for_keeps_awkward_but_safe_names(tmp_path):
    assert local_path_for(str(tmp_path), "a b/é %#+.txt") == str(tmp_path / "a b" / "é %#+.txt")


@pytest.mark.parametrize("text", [
    f"DefaultEndpointsProtocol=https;AccountName=a;AccountKey={KEY};EndpointSuffix=core.windows.net",
    "https://a.blob.core.windows.net/c/b?sv=2021-08-06&se=2030&sig=abcDEF%2B123%3D&sp=r",
    f"the key is {KEY}.",
    "Authorization: SharedKey devstoreaccount1:c2lnbmF0dXJl",
    "redirect=https%3A%2F%2Fa.blob.core.windows.net%2Fc%3Fsv%3D1%26sig%3DabcDEF%252B1%26sp%3Dr",
    f"{{'account_key': '{KEY[:30]}', 'account_key_env': 'X'}}",
    '{"sas_token": "sv=2021&sp=r&sig=abcDEF"}',
])
def test_redact_removes_secrets(text):
    out = redact(text)
    assert KEY[:30] not in out and "abcDEF" not in out and "c2lnbmF0dXJl" not in out
    assert "REDACTED" in out


def test_redact_leaves_plain_text():
    assert redact("downloaded 3 files from data/x") == "downloaded 3 files from data/x"
    assert redact("{'account_key_env': 'STORAGE_KEY'} design%3Dx") == "{'account_key_env': 'STORAGE_KEY'} design%3Dx"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_lines_are_one_per_event_and_scrub_exceptions(fmt, capsys):
    import json
    import logging

    from mountd import logsetup
    logsetup.setup("info", fmt=fmt)
    try:
        raise RuntimeError(f"GET https://a.blob.core.windows.net/c?sv=1&sig=abcDEF failed; AccountKey={KEY}")
    except RuntimeError:
        logging.getLogger("mountd.test").exception("upload of %s failed", "outputs")
    logging.getLogger("mountd.test").debug("not shown at info")
    err = capsys.readouterr().err
    assert "abcDEF" not in err and KEY not in err and "REDACTED" in err and "not shown" not in err
    if fmt == "json":
        [line] = err.splitlines()  # the traceback stays inside the one JSON line
        record = json.loads(line)
        assert record["level"] == "error" and record["message"].startswith("upload of outputs failed")
        assert "Traceback" in record["message"]
    else:
        assert err.startswith("mountd: error: upload of outputs failed")
    logsetup.setup("warning")


class _Resp:
    def __init__(self, headers):
        self.headers = headers


class _Hist:
    def __init__(self, headers):
        self.http_response = _Resp(headers)


def test_backoff_grows_with_jitter_and_is_capped():
    policy = BackoffRetry(initial=0.5, maximum=4.0)
    for count, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (10, 4.0)]:
        value = policy.get_backoff_time({"count": count, "history": []})
        assert ceiling / 2 <= value <= ceiling


def test_backoff_honours_retry_after():
    policy = BackoffRetry()
    assert policy.get_backoff_time({"count": 0, "history": [_Hist({"Retry-After": "3"})]}) == 3.0
    assert policy.get_backoff_time({"count": 0, "history": [_Hist({"Retry-After": "9999"})]}) == MAX_RETRY_AFTER
    assert policy.get_backoff_time({"count": 0, "history": [_Hist({"x-ms-retry-after-ms": "1500"})]}) == 1.5


def test_summary_line_reports_skips_and_failures():
    report = TransferReport("downloaded", files=2, bytes=3 * 1024 * 1024, skipped=1, seconds=1.5)
    report.failed.append(("x", "boom"))
    line = report.summary()
    assert line.startswith("downloaded 2 files (3.0 MiB) in 1.5 s")
    assert "skipped 1 existing" in line and "1 failed" in line


def test_progress_without_terminal_draws_no_bar():
    stream = io.StringIO()
    progress = Progress(TransferReport("uploaded"), enabled=True, stream=stream)
    progress.add_total(10)
    progress.bytes_moved(10)
    progress.file_done()
    report = progress.close()
    assert stream.getvalue() == ""
    assert (report.files, report.bytes) == (1, 10)


def test_human_size():
    assert human_size(512) == "512 B"
    assert human_size(1536) == "1.5 KiB"
    assert human_size(3 * 1024 ** 3) == "3.0 GiB"
