"""Tests of the hospital deployment: provisioning, daemons, runs over TLS."""
