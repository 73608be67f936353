"""Runnable examples of slack_fathom_db in an application."""
