"""The processes around the data: mount workers and their supervision, a
run's lifecycle (`mountd run`), the daemon, stop signals and `mountd status`."""
