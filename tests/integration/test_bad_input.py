"""A catalogue of bad workspace files, command lines and environment
settings. Each must give exit 2 and one line `mountd: error: ...` naming the
problem, and must mount nothing and write nothing. (Bad manifests are
catalogued in tests/unit/test_manifest.py, with a fuzzer.)

The command line runs in-process (`mountd.cli.main`): a subprocess per case
would cost the suite half a minute; a few cases run as real processes too."""

import logging
import os
import subprocess
import sys

import pytest

from mountd.cli import main as cli_main
from mountd.run import mounts
from tests.support.faultproxy import TOTALS

SECRET = "c2VjcmV0LXZhbHVlLXRoYXQtbXVzdC1ub3QtbGVhaw=="  # base64, like an account key

BASE = """\
default_datastore: good
datastores:
  good: {type: local, root: @TMP@/root}
  blob: {type: azure_blob, account_name: acct, container_name: data, endpoint: 'http://127.0.0.1:9/acct',
         credential: {account_key_env: BLOB_KEY}}
  emu: {type: azure_blob, container_name: data, endpoint: 'http://127.0.0.1:9/acct'}
  emumi: {type: azure_blob, container_name: data, endpoint: 'http://127.0.0.1:9/acct',
          credential: {managed_identity: true}}
"""

LIST = ["datastore", "list"]
MOUNT = ["mount", "good", "@TMP@/mp"]

WORKSPACES = [
    # (id, workspace file text, command, fragment of the one error line)
    ("top-level-list", "- a\n- b\n", LIST, "must be a mapping"),
    ("unknown-top-level-key", "colour: blue\n", LIST, "unknown key 'colour'"),
    ("datastores-list", "datastores: [a, b]\n", LIST, "datastores must be a mapping"),
    ("datastore-scalar", "datastores: {a: 5}\n", LIST, "must be a mapping, got int"),
    ("unknown-type", "datastores: {a: {type: s3}}\n", LIST, "type must be one of"),
    ("type-missing", "datastores: {a: {root: /x}}\n", LIST, "type must be one of"),
    ("unknown-field", "datastores: {a: {type: local, root: /x, colour: 1}}\n", LIST, "unknown field 'colour'"),
    ("field-of-other-type", "datastores: {a: {type: local, root: /x, container_name: c}}\n", LIST,
     "unknown field 'container_name'"),
    ("invalid-name", "datastores: {bad-name: {type: local, root: /x}}\n", LIST, "bad-name"),
    ("name-with-space", "datastores: {'a b': {type: local, root: /x}}\n", LIST, "'a b'"),
    ("non-string-name", "datastores: {1: {type: local, root: /x}}\n", LIST, "1"),
    ("huge-name", "datastores:\n  ? " + "n" * 5000 + "\n  : {type: local, root: /x}\n", LIST, "nnnn"),
    ("names-differ-in-case", "datastores: {a: {type: local, root: /x}, A: {type: local, root: /y}}\n", LIST,
     "differ only in case"),
    ("container-uppercase", "datastores: {a: {type: azure_blob, account_name: x, container_name: Data}}\n", LIST,
     "invalid container_name 'Data'"),
    ("container-too-short", "datastores: {a: {type: azure_blob, account_name: x, container_name: ab}}\n", LIST,
     "invalid container_name 'ab'"),
    ("container-double-hyphen", "datastores: {a: {type: azure_blob, account_name: x, container_name: a--b}}\n",
     LIST, "invalid container_name"),
    ("container-huge", "datastores: {a: {type: azure_blob, account_name: x, container_name: " + "c" * 100_000
     + "}}\n", LIST, "invalid container_name"),
    ("container-number", "datastores: {a: {type: azure_blob, account_name: x, container_name: 123}}\n", LIST,
     "container_name must be a non-empty string"),
    ("container-missing", "datastores: {a: {type: azure_blob, account_name: x}}\n", LIST,
     "container_name is required"),
    ("account-missing", "datastores: {a: {type: azure_blob, container_name: data}}\n", LIST,
     "account_name is required"),
    ("endpoint-ftp", "datastores: {a: {type: azure_blob, container_name: data, endpoint: 'ftp://x/y'}}\n", LIST,
     "endpoint must be an http(s) URL"),
    ("endpoint-no-host", "datastores: {a: {type: azure_blob, container_name: data, endpoint: 'http://'}}\n", LIST,
     "endpoint must be an http(s) URL"),
    ("endpoint-without-account", "datastores: {a: {type: azure_blob, container_name: data, "
     "endpoint: 'http://127.0.0.1:10000'}}\n", LIST, "must include the account, e.g. "
     "http://127.0.0.1:10000/devstoreaccount1"),
    ("endpoint-localhost-without-account", "datastores: {a: {type: azure_file, share_name: data, "
     "endpoint: 'http://localhost:10004/'}}\n", LIST, "names no account"),
    ("endpoint-with-sas", "datastores: {a: {type: azure_blob, container_name: data, endpoint: 'https://x/y?sig="
     + SECRET + "'}}\n", LIST, "must not carry a query string"),
    ("credential-scalar", "datastores: {a: {type: azure_blob, account_name: x, container_name: data, "
     "credential: " + SECRET + "}}\n", LIST, "credential must be a mapping"),
    ("credential-unknown-key", "datastores: {a: {type: azure_blob, account_name: x, container_name: data, "
     "credential: {password: x}}}\n", LIST, "unknown credential key 'password'"),
    ("two-credentials", "datastores: {a: {type: azure_blob, account_name: x, container_name: data, "
     "credential: {account_key_env: A, sas_token_env: B}}}\n", LIST, "give one credential"),
    ("credential-env-empty", "datastores: {a: {type: azure_blob, account_name: x, container_name: data, "
     "credential: {account_key_env: ''}}}\n", LIST, "credential.account_key_env must be a non-empty string"),
    ("credential-env-number", "datastores: {a: {type: azure_blob, account_name: x, container_name: data, "
     "credential: {sas_token_env: 5}}}\n", LIST, "credential.sas_token_env must be a non-empty string"),
    ("managed-identity-yes", "datastores: {a: {type: azure_blob, account_name: x, container_name: data, "
     "credential: {managed_identity: 'yes'}}}\n", LIST, "credential.managed_identity must be true"),
    ("local-root-relative", "datastores: {a: {type: local, root: data/here}}\n", LIST, "root must be an absolute"),
    ("local-root-empty", "datastores: {a: {type: local, root: ''}}\n", LIST, "root must be a non-empty string"),
    ("local-root-missing", "datastores: {a: {type: local}}\n", LIST, "root is required"),
    ("allowed-roots-scalar", "allowed_roots: /x\n", LIST, "allowed_roots must be a list"),
    ("allowed-roots-relative", "allowed_roots: [x/y]\n", LIST, "allowed_roots must be a list of absolute paths"),
    ("cache-scalar", "cache: big\n", LIST, "cache must be a mapping"),
    ("cache-unknown-setting", BASE + "cache: {colour: blue}\n", MOUNT, "unknown cache setting 'colour'"),
    ("cache-bad-size", BASE + "cache: {memory: lots}\n", MOUNT, "cache.memory: expected a size"),
    ("cache-negative-size", BASE + "cache: {max_size: -5GB}\n", MOUNT, "cache.max_size: must not be negative"),
    ("cache-huge-size", BASE + "cache: {max_size: 2000TB}\n", MOUNT, "is too large"),
    ("cache-bad-duration", BASE + "cache: {attribute_ttl: 5y}\n", MOUNT, "cache.attribute_ttl: expected a duration"),
    ("cache-duration-out-of-range", BASE + "cache: {attribute_ttl: 400000h}\n", MOUNT, "out of range"),
    ("cache-threads-zero", BASE + "cache: {threads: 0}\n", MOUNT, "cache.threads: expected a whole number"),
    ("cache-disk-string", BASE + "cache: {disk: 'no'}\n", MOUNT, "cache.disk: expected true or false"),
    ("cache-dir-relative", BASE + "cache: {dir: cache}\n", MOUNT, "cache.dir: expected an absolute"),
    ("cache-memory-below-blocks", BASE + "cache: {memory: 1MiB, block_size: 8MiB}\n", MOUNT, "must hold at least"),
    ("default-unknown", "default_datastore: nosuch\n", LIST, "unknown datastore 'nosuch'"),
    ("default-invalid-name", "default_datastore: 'no such'\n", LIST, "'no such'"),
    ("invalid-yaml", "datastores: {a: [\n", LIST, "invalid YAML"),
    ("duplicate-key", "default_datastore: a\ndefault_datastore: b\n", LIST, "duplicate key"),
    ("tab-indented", "datastores:\n\ta: {type: local, root: /x}\n", LIST, "invalid YAML"),
]

BLOB_OUT = ["download", "blob", "@TMP@/out"]

COMMANDS = [
    # (id, arguments, environment changes (None unsets), fragment)
    ("no-command", [], {}, "the following arguments are required"),
    ("unknown-command", ["frobnicate"], {}, "invalid choice: 'frobnicate'"),
    ("unknown-option", ["download", "good", "@TMP@/out", "--bogus"], {}, "unrecognized arguments: --bogus"),
    ("workers-not-a-number", ["download", "good", "@TMP@/out", "--workers", "abc"], {}, "expected a whole number"),
    ("workers-zero", ["download", "good", "@TMP@/out", "--workers", "0"], {}, "expected 1 to 1024"),
    ("workers-huge", ["download", "good", "@TMP@/out", "--workers", "99999999"], {}, "expected 1 to 1024"),
    ("log-level-bogus", ["--log-level", "loud", "datastore", "list"], {}, "invalid choice: 'loud'"),
    ("double-dash-outside-run", ["download", "good", "@TMP@/out", "--", "ls"], {}, "only for `mountd run`"),
    ("unknown-datastore", ["download", "nosuch", "@TMP@/out"], {}, "unknown datastore 'nosuch'"),
    ("download-into-a-file", ["download", "good", "@TMP@/afile"], {}, "is not a directory"),
    ("upload-missing-dir", ["upload", "good", "@TMP@/absent"], {}, "does not exist"),
    ("upload-a-file", ["upload", "good", "@TMP@/afile"], {}, "is not a directory"),
    ("upload-target-escapes", ["upload", "good", "@TMP@/src", "--target-path", "a/../../b"], {},
     "must not contain '..'"),
    ("mount-bad-memory", MOUNT + ["--memory-cache", "lots"], {}, "--memory-cache: expected a size"),
    ("mount-small-block", MOUNT + ["--block-size", "1KiB"], {}, "block size must be between"),
    ("mount-negative-cache", MOUNT + ["--cache-max-size=-5GB"], {}, "must not be negative"),
    ("mount-bad-ttl", MOUNT + ["--attribute-ttl", "5y"], {}, "--attribute-ttl: expected a duration"),
    ("mount-negative-ttl", MOUNT + ["--attribute-ttl=-1s"], {}, "--attribute-ttl: expected a duration"),
    ("mount-option-without-value", MOUNT + ["--attribute-ttl", "-1s"], {}, "expected one argument"),
    ("mount-readahead-huge", MOUNT + ["--readahead-blocks", "999"], {}, "expected 0 to 256"),
    ("mount-threads-zero", MOUNT + ["--threads", "0"], {}, "expected 1 to 128"),
    ("mount-missing-mountpoint", ["mount", "good", "@TMP@/absent"], {}, "does not exist"),
    ("mount-not-empty", ["mount", "good", "@TMP@/src"], {}, "is not empty"),
    ("mount-on-a-file", ["mount", "good", "@TMP@/afile"], {}, "is not a directory"),
    ("mount-path-escapes", ["mount", "good:../x", "@TMP@/mp"], {}, "must not contain '..'"),
    ("mount-unknown-datastore", ["mount", "nosuch", "@TMP@/mp"], {}, "unknown datastore 'nosuch'"),
    ("mount-env-bad-size", MOUNT, {"DATASET_MOUNT_CACHE_SIZE": "lots"}, "$DATASET_MOUNT_CACHE_SIZE"),
    ("mount-env-threads-zero", MOUNT, {"DATASET_MOUNT_READ_THREADS": "0"}, "$DATASET_MOUNT_READ_THREADS"),
    ("mount-env-bad-ttl", MOUNT, {"DATASET_MOUNT_ATTRIBUTE_CACHE_TTL": "soon"}, "$DATASET_MOUNT_ATTRIBUTE_CACHE_TTL"),
    ("mount-env-reserve-negative", MOUNT, {"DATASET_RESERVED_FREE_DISK_SPACE": "-1GB"},
     "$DATASET_RESERVED_FREE_DISK_SPACE"),
    ("unmount-not-mounted", ["unmount", "@TMP@/mp"], {}, "is not mounted"),
    ("default-chain-token-over-http", ["download", "emu", "@TMP@/out"], {}, "datastore 'emu': a token"),
    ("managed-identity-over-http", ["upload", "emumi", "@TMP@/src"], {}, "is sent only over https"),
    ("mount-token-over-http", ["mount", "emu", "@TMP@/mp"], {}, "is sent only over https"),
    ("mount-credential-variable-unset", ["mount", "blob", "@TMP@/mp"], {"BLOB_KEY": None},
     "environment variable BLOB_KEY"),
    ("credential-variable-unset", BLOB_OUT, {"BLOB_KEY": None}, "environment variable BLOB_KEY"),
    ("credential-variable-empty", BLOB_OUT, {"BLOB_KEY": ""}, "from $BLOB_KEY is empty"),
    ("account-key-not-base64", BLOB_OUT, {"BLOB_KEY": "c2VjcmV0LXZhbHVlLXRoYXQtbXVzd"},
     "the account key from $BLOB_KEY is not valid base64: check for a truncated paste"),
    ("account-key-not-base64-mount", ["mount", "blob", "@TMP@/mp"], {"BLOB_KEY": "not a key!"},
     "is not valid base64"),
    ("credential-variable-blank", BLOB_OUT, {"BLOB_KEY": "  \n"}, "from $BLOB_KEY is empty"),
    ("storage-retries-not-a-number", BLOB_OUT, {"MOUNTD_STORAGE_RETRIES": "many"}, "$MOUNTD_STORAGE_RETRIES"),
    ("storage-retries-huge", BLOB_OUT, {"MOUNTD_STORAGE_RETRIES": "100000"}, "$MOUNTD_STORAGE_RETRIES"),
    ("storage-timeout-zero", BLOB_OUT, {"MOUNTD_STORAGE_READ_TIMEOUT": "0"}, "$MOUNTD_STORAGE_READ_TIMEOUT"),
    ("storage-timeout-bad", BLOB_OUT, {"MOUNTD_STORAGE_CONNECT_TIMEOUT": "-1s"}, "$MOUNTD_STORAGE_CONNECT_TIMEOUT"),
    ("register-bad-name", ["datastore", "register-local", "bad-name", "--root", "@TMP@/root"], {},
     "invalid datastore name 'bad-name'"),
    ("register-bad-endpoint", ["datastore", "register-blob", "x", "--container-name", "data", "--endpoint",
                               "ftp://host/acct", "--anonymous"], {}, "endpoint must be an http(s) URL"),
    ("register-no-credential-over-http", ["datastore", "register-blob", "x", "--container-name", "data",
                                          "--endpoint", "http://127.0.0.1:9/acct"], {},
     "no credential given for http://127.0.0.1:9/acct: use --account-key-env, --sas-token-env"),
    ("register-bad-container", ["datastore", "register-blob", "x", "--account-name", "a", "--container-name",
                                "UPPER", "--anonymous"], {}, "invalid container_name 'UPPER'"),
    ("register-no-container", ["datastore", "register-blob", "x", "--account-name", "a"], {},
     "the following arguments are required: --container-name"),
    ("register-two-credentials", ["datastore", "register-blob", "x", "--account-name", "a", "--container-name",
                                  "data", "--anonymous", "--managed-identity"], {}, "not allowed with argument"),
    ("register-key-file-missing", ["datastore", "register-blob", "x", "--account-name", "a", "--container-name",
                                   "data", "--account-key-file", "@TMP@/absent"], {}, "cannot read account_key file"),
    ("register-local-missing-root", ["datastore", "register-local", "x", "--root", "@TMP@/absent"], {},
     "is not a directory"),
    ("register-existing", ["datastore", "register-local", "good", "--root", "@TMP@/root"], {},
     "is already registered"),
    ("show-unknown", ["datastore", "show", "nope"], {}, "unknown datastore 'nope'"),
    ("set-default-unknown", ["datastore", "set-default", "nope"], {}, "unknown datastore 'nope'"),
    ("remove-built-in", ["datastore", "remove", "workspacelocalstore"], {}, "built in and cannot be removed"),
    ("run-missing-manifest", ["run", "@TMP@/absent.yaml"], {}, "does not exist"),
    ("validate-missing-manifest", ["validate", "@TMP@/absent.yaml"], {}, "does not exist"),
    ("workspace-missing", ["--workspace", "@TMP@/absent.yaml", "datastore", "list"], {},
     "the workspace file @TMP@/absent.yaml (named by --workspace) does not exist"),
    ("workspace-missing-after-command", ["upload", "good", "@TMP@/src", "--workspace", "@TMP@/absent.yaml"], {},
     "does not exist: check the path"),
    ("workspace-variable-missing", ["datastore", "list"], {"MOUNTD_WORKSPACE": "/nonexistent/ws.yaml"},
     "the workspace file /nonexistent/ws.yaml (named by $MOUNTD_WORKSPACE) does not exist"),
    ("workspace-is-a-directory", ["--workspace", "@TMP@/root", "datastore", "list"], {}, "@TMP@/root"),
]


def _snapshot(root) -> dict:
    out = {}
    for dirpath, dirnames, names in os.walk(root):
        for name in names + dirnames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            out[path] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """run(argv, workspace_text, env) -> (code, out, err), with the checks
    every case shares: nothing written under tmp_path, nothing mounted."""
    for d in ("root", "src", "mp"):
        (tmp_path / d).mkdir()
    (tmp_path / "src" / "x.txt").write_text("x")
    (tmp_path / "afile").write_text("a file")
    ws = tmp_path / "ws.yaml"
    monkeypatch.setenv("MOUNTD_WORKSPACE", str(ws))
    monkeypatch.setenv("BLOB_KEY", SECRET)
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, {n: logging.getLogger(n).level for n in ("azure", "urllib3", "msal")})

    def mine():  # (other test runs on the machine mount and unmount meanwhile)
        return [m for m in mounts.mount_points() if m.startswith(str(tmp_path))]

    def run(argv, text=BASE, env=None):
        ws.write_text(text.replace("@TMP@", str(tmp_path)))
        for key, value in (env or {}).items():
            if value is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, value)
        argv = [a.replace("@TMP@", str(tmp_path)) for a in argv]
        before, mounted = _snapshot(tmp_path), mine()
        try:
            code = cli_main(argv)
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        assert _snapshot(tmp_path) == before, "something was written"
        assert mine() == mounted, "something was mounted"
        TOTALS["bad_inputs"] += 1
        return code, out, err.replace(str(tmp_path), "@TMP@")

    yield run
    root.handlers[:], root.level = saved[0], saved[1]
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


def _one_line_exit_2(code, out, err, fragment):
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("mountd: error: "), err
    assert fragment in lines[0], err
    assert len(lines[0]) < 600, f"{len(lines[0])} characters"
    assert "Traceback" not in err and SECRET not in err + out and out == ""


@pytest.mark.parametrize("text, argv, fragment", [c[1:] for c in WORKSPACES], ids=[c[0] for c in WORKSPACES])
def test_bad_workspace_file(cli, text, argv, fragment):
    _one_line_exit_2(*cli(argv, text), fragment)


@pytest.mark.parametrize("argv, env, fragment", [c[1:] for c in COMMANDS], ids=[c[0] for c in COMMANDS])
def test_bad_command_line(cli, argv, env, fragment):
    _one_line_exit_2(*cli(argv, env=env), fragment)


def test_the_catalogue_is_big_enough():
    from tests.unit.test_manifest import BAD
    assert len(WORKSPACES) >= 40 and len(COMMANDS) >= 40 and len(BAD) >= 40


@pytest.mark.parametrize("case", ["mount-missing-mountpoint", "credential-variable-unset", "container-uppercase"])
def test_as_a_real_process(case, tmp_path):
    # The in-process runs above, confirmed for a few through a real process.
    text, argv, env, fragment = BASE, None, {}, None
    for c in COMMANDS:
        if c[0] == case:
            argv, env, fragment = c[1], c[2], c[3]
    for c in WORKSPACES:
        if c[0] == case:
            text, argv, fragment = c[1], c[2], c[3]
    (tmp_path / "root").mkdir()
    ws = tmp_path / "ws.yaml"
    ws.write_text(text.replace("@TMP@", str(tmp_path)))
    full = dict(os.environ, MOUNTD_WORKSPACE=str(ws), BLOB_KEY=SECRET)
    for key, value in env.items():
        full.pop(key, None) if value is None else full.__setitem__(key, value)
    r = subprocess.run([sys.executable, "-m", "mountd", *[a.replace("@TMP@", str(tmp_path)) for a in argv]],
                       capture_output=True, text=True, env=full, timeout=60)
    _one_line_exit_2(r.returncode, r.stdout, r.stderr, fragment.replace("@TMP@", str(tmp_path)))
