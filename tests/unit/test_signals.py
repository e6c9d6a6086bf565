"""The stop-signal state machine (run/signals.py) driven by real signals sent
to this process, with a real training process to pass them to."""

import logging
import os
import signal
import subprocess
import sys

import pytest

from mountd.run.signals import ABORTING, DAEMON_SIGNALS, FORWARDED, STOPPING, WORKING, StopSignals


@pytest.fixture(autouse=True)
def handlers_put_back(caplog):
    caplog.set_level(logging.INFO, logger="mountd")
    saved = {sig: signal.getsignal(sig) for sig in FORWARDED}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def installed(*args, **kwargs) -> StopSignals:
    s = StopSignals(*args, **kwargs)
    s.install()
    return s


def _raise(sig):
    # the handler runs on the main thread at the next bytecode after delivery
    os.kill(os.getpid(), sig)


def test_daemon_first_signal_stops_the_second_aborts_uploads(caplog):
    s = installed(DAEMON_SIGNALS)
    _raise(signal.SIGTERM)
    assert s.state == STOPPING and s.stop.is_set() and not s.abort_uploads.is_set()
    _raise(signal.SIGINT)
    assert s.state == ABORTING and s.abort_uploads.is_set()
    _raise(signal.SIGTERM)  # once aborting, more signals change nothing and say nothing more
    assert s.state == ABORTING
    assert caplog.text.count("aborting uploads") == 1


def test_daemon_sighup_is_ignored_with_a_note(caplog):
    s = installed(DAEMON_SIGNALS, ignored_note=": restart the service")
    _raise(signal.SIGHUP)
    assert s.state == WORKING and not s.stop.is_set()
    assert "SIGHUP ignored: restart the service" in caplog.text


def test_run_stop_before_the_work_interrupts():
    s = installed(FORWARDED, interrupt_before_work=True)
    with pytest.raises(KeyboardInterrupt):
        _raise(signal.SIGTERM)
    assert s.state == STOPPING
    _raise(signal.SIGTERM)  # during the uploads that follow: stops them, raises nothing
    assert s.abort_uploads.is_set()


def test_run_signals_go_to_the_live_training_process_then_stop_its_uploads(caplog):
    s = installed(FORWARDED, interrupt_before_work=True)
    child = subprocess.Popen([sys.executable, "-c",
                              "import signal, sys, time\n"
                              "signal.signal(signal.SIGUSR1, lambda *a: print('usr1', flush=True))\n"
                              "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
                              "print('ready', flush=True)\n"
                              "time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"
    s.forward_to(child)
    _raise(signal.SIGUSR1)
    assert child.stdout.readline() == "usr1\n"
    _raise(signal.SIGTERM)
    assert child.wait(30) == 143
    assert s.state == WORKING and not s.abort_uploads.is_set()  # the signal was the training process's
    assert "passed signal SIGTERM to the training process" in caplog.text
    _raise(signal.SIGTERM)  # the training process has ended: this one is for the uploads
    assert s.state == ABORTING and s.abort_uploads.is_set()


def test_work_done_makes_the_first_signal_stop_the_uploads():
    s = installed(FORWARDED, interrupt_before_work=True)
    s.work_done()
    _raise(signal.SIGINT)
    assert s.abort_uploads.is_set()


def test_abort_from_a_deadline_and_restore(caplog):
    s = StopSignals(DAEMON_SIGNALS)
    before = signal.getsignal(signal.SIGTERM)
    s.install()
    assert signal.getsignal(signal.SIGTERM) != before
    s.abort("stop took too long")
    assert s.abort_uploads.is_set() and "stop took too long: aborting uploads" in caplog.text
    s.restore()
    assert signal.getsignal(signal.SIGTERM) == before
