"""`mountd status`: what the running daemons and mount workers report on
their control sockets, as text, JSON, or Prometheus text exposition.

The Prometheus form is for a node exporter's textfile collector or a scrape
through a small wrapper. Records of processes that are gone are pruned on the way (runtime.py); a
process that is alive but does not answer is listed with the reason.
"""

from __future__ import annotations

import datetime
import json

from mountd.run import control, runtime
from mountd.transfer.progress import human_size

# What a record may show when its process does not answer: no secrets live in
# records, but nothing beyond these is needed.
_RECORD_KEYS = ("pid", "manifest", "run_id", "mountpoint", "datastore", "path", "mode", "owner")


def gather() -> dict:
    out: dict[str, list] = {"daemons": [], "mounts": []}
    for kind in ("daemons", "mounts"):
        for record in runtime.live_records(kind):
            try:
                out[kind].append(control.query(record["control"]))
            except OSError as e:
                entry = {k: record[k] for k in _RECORD_KEYS if k in record}
                entry["error"] = f"no answer on its control socket: {e}"
                out[kind].append(entry)
    return out


def as_json(status: dict) -> str:
    return json.dumps(status, indent=2, sort_keys=True)


# -- text -----------------------------------------------------------------------------------
def as_text(status: dict) -> str:
    if not status["daemons"] and not status["mounts"]:
        return f"nothing running: no mountd daemon or mount recorded under {runtime.runtime_dir()}"
    lines = []
    for d in status["daemons"]:
        head = f"daemon {d.get('pid')}: {d.get('manifest')} (run {d.get('run_id')}"
        head += f", node {d['node_rank']})" if "node_rank" in d else ")"
        if "error" in d:
            lines += [head, f"  {d['error']}"]
            continue
        since = d.get("ready_at") or d.get("started")
        lines.append(f"{head}: {d['phase']} since {_clock(since)}")
        for m in d["mounts"]:
            lines.append(f"  mount {m['name']}: {m['datastore']}:{m['path'] or '/'} on {m['mountpoint']} "
                         f"({m['mode']}, {m['state']}, worker {m['worker_pid']}, {m['restarts']} restart(s))")
        for s in d["staging"]:
            lines.append(f"  {'staged' if s['done'] else 'staging'} {s['name']}: "
                         f"{s['files'] + s['skipped']}/{s['files_total']} files, "
                         f"{human_size(s['bytes'])} of {human_size(s['bytes_total'])}"
                         + (f", {s['failed']} failed" if s["failed"] else ""))
        for u in d["uploads"]:
            lines.append(f"  upload {u['name']}: {u['path_on_compute']} -> {u['datastore']}:{u['path'] or '/'} "
                         f"({u['state']})")
        if d["pending_uploads"]:
            lines.append(f"  pending uploads from an earlier run: {', '.join(map(str, d['pending_uploads']))}")
        for failure in d["failures"]:
            lines.append(f"  failed: {failure}")
    for m in status["mounts"]:
        head = (f"mount {m.get('mountpoint')}: {m.get('datastore')}:{m.get('path') or '/'} "
                f"({m.get('mode')}, pid {m.get('pid')})")
        if "error" in m:
            lines += [head, f"  {m['error']}"]
            continue
        c = m["cache"]
        lines += [head,
                  f"  cache hit ratio {c['hit_ratio']:.1%} (memory {c['memory_hits']}, disk {c['disk_hits']}, "
                  f"misses {c['misses']}); read from storage {human_size(c['bytes_from_storage'])}, "
                  f"served {human_size(m['bytes_served'])}",
                  f"  memory cache {human_size(c['memory_used'])} of {human_size(c['memory_max'])}; disk cache "
                  f"{human_size(c['disk_used'])} of {human_size(c['disk_max'])}; {m['open_files']} open file(s), "
                  f"{m['read_errors']} read error(s)"]
        p = m.get("prefetch")
        if p:
            lines.append(_prefetch_line(p))
        w = m.get("writes")
        if w:
            lines.append(f"  writes: {w['uploads']} file(s) uploaded, {w['upload_errors']} failed upload(s), "
                         f"{w['pending_uploads']} not yet in storage, {w['staged_files']} staged in {w['work_dir']}")
    return "\n".join(lines)


def _prefetch_line(p: dict) -> str:
    listed = f"{p['files_listed']}" + ("+" if p["state"] == "listing" else "")
    line = (f"  prefetch {p['state']}: {p['files']} of {listed} files, {human_size(p['bytes'])} of "
            f"{human_size(p['bytes_listed'])}, {human_size(p['rate'])}/s from storage")
    if p["state"] == "prefetching" and p["eta"] is not None:
        line += f", {p['eta']:.0f} s left"
    if p["files_cached"]:
        line += f"; {p['files_cached']} were cached already"
    if p["files_failed"]:
        line += f"; {p['files_failed']} failed (read on demand)"
    if p["stopped"]:
        line += f"; stopped: {p['stopped']}"
    return line


def _clock(ts) -> str:
    if not ts:
        return "?"
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


# -- Prometheus -----------------------------------------------------------------------------
class _Exposition:
    """Samples grouped by metric, each metric with its HELP and TYPE once."""

    def __init__(self):
        self.metrics: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, name: str, kind: str, help_text: str, labels: dict, value) -> None:
        if value is None:
            return
        entry = self.metrics.setdefault(name, (kind, help_text, []))
        body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        number = str(int(value)) if isinstance(value, (bool, int)) else repr(float(value))  # counters stay exact
        entry[2].append(f"{name}{{{body}}} {number}" if body else f"{name} {number}")

    def text(self) -> str:
        out = []
        for name, (kind, help_text, samples) in self.metrics.items():
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]
        return "\n".join(out) + "\n"


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_MOUNT_COUNTERS = (  # (metric, key in cache or mount, help)
    ("mountd_mount_bytes_served_total", None, "bytes_served", "Bytes returned to readers of the mount."),
    ("mountd_mount_bytes_from_storage_total", "cache", "bytes_from_storage", "Bytes read from storage."),
    ("mountd_mount_bytes_from_disk_cache_total", "cache", "bytes_from_disk", "Bytes read from the disk cache."),
    ("mountd_mount_cache_misses_total", "cache", "misses", "Blocks fetched from storage."),
    ("mountd_mount_read_errors_total", None, "read_errors", "Reads answered with an error."),
    ("mountd_mount_uploads_total", "writes", "uploads", "Files a read-write mount uploaded."),
    ("mountd_mount_upload_errors_total", "writes", "upload_errors", "Uploads of a read-write mount that failed."),
    ("mountd_mount_prefetch_bytes_from_storage_total", "prefetch", "bytes_from_storage",
     "Bytes the dataset prefetch read from storage into the disk cache."),
)
_MOUNT_GAUGES = (
    ("mountd_mount_cache_hit_ratio", "cache", "hit_ratio", "Share of block lookups served by a cache."),
    ("mountd_mount_memory_cache_bytes", "cache", "memory_used", "Bytes in the memory cache."),
    ("mountd_mount_memory_cache_max_bytes", "cache", "memory_max", "Cap of the memory cache."),
    ("mountd_mount_disk_cache_bytes", "cache", "disk_used", "Bytes in the disk cache."),
    ("mountd_mount_disk_cache_max_bytes", "cache", "disk_max", "Cap of the disk cache."),
    ("mountd_mount_open_files", None, "open_files", "Files open on the mount."),
    ("mountd_mount_staged_files", "writes", "staged_files", "Files of a read-write mount staged locally."),
    ("mountd_mount_pending_uploads", "writes", "pending_uploads",
     "Written files of a read-write mount not yet in storage."),
    ("mountd_mount_prefetch_files", "prefetch", "files", "Files the dataset prefetch has in the disk cache."),
    ("mountd_mount_prefetch_files_listed", "prefetch", "files_listed", "Files the dataset prefetch listed so far."),
    ("mountd_mount_prefetch_bytes", "prefetch", "bytes", "Bytes of the files the dataset prefetch has cached."),
    ("mountd_mount_prefetch_bytes_listed", "prefetch", "bytes_listed", "Bytes the dataset prefetch listed so far."),
    ("mountd_mount_prefetch_rate_bytes", "prefetch", "rate", "Bytes per second the dataset prefetch reads."),
    ("mountd_mount_prefetch_eta_seconds", "prefetch", "eta", "Seconds the dataset prefetch expects to take still."),
)


def as_prometheus(status: dict) -> str:
    x = _Exposition()
    for m in status["mounts"]:
        labels = {"mountpoint": m.get("mountpoint"), "datastore": m.get("datastore"), "path": m.get("path") or ""}
        x.add("mountd_mount_up", "gauge", "1 while the mount answers its control socket.",
              labels, 0 if "error" in m else 1)
        if "error" in m:
            continue
        for tier in ("memory", "disk"):
            x.add("mountd_mount_cache_hits_total", "counter", "Blocks served by a cache tier.",
                  dict(labels, tier=tier), m["cache"][f"{tier}_hits"])
        for kind, table in (("counter", _MOUNT_COUNTERS), ("gauge", _MOUNT_GAUGES)):
            for name, section, key, help_text in table:
                source = m.get(section, {}) if section else m
                x.add(name, kind, help_text, labels, source.get(key))
    for d in status["daemons"]:
        base = {"manifest": d.get("manifest"), "run_id": d.get("run_id")}
        x.add("mountd_daemon_ready", "gauge", "1 once the daemon has told systemd READY=1, until it stops.",
              base, 1 if d.get("phase") == "ready" else 0)
        if "error" in d:
            continue
        for s in d["staging"]:
            labels = dict(base, reference=s["name"])
            x.add("mountd_staging_bytes", "gauge", "Bytes of a download reference staged so far.", labels, s["bytes"])
            x.add("mountd_staging_bytes_planned", "gauge", "Bytes of a download reference listed so far.",
                  labels, s["bytes_total"])
            x.add("mountd_staging_files", "gauge", "Files of a download reference staged or found unchanged.",
                  labels, s["files"] + s["skipped"])
            x.add("mountd_staging_files_planned", "gauge", "Files of a download reference listed so far.",
                  labels, s["files_total"])
        for m in d["mounts"]:
            x.add("mountd_mount_restarts_total", "counter",
                  "Mount workers restarted after dying, since the daemon started.",
                  dict(base, reference=m["name"]), m["restarts"])
        x.add("mountd_pending_uploads", "gauge", "Upload references an earlier run left pending.",
              base, len(d["pending_uploads"]))
    return x.text()
