"""Bulk transfers between storage and local directories."""
