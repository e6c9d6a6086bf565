"""Processes: mount workers and their supervision, and (later) the run
lifecycle and the daemon."""
