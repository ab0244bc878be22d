"""The management API (twisted.web): queue control, delivery pause, stats, log levels; see docs/api.md."""
