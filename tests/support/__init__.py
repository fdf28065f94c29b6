"""Helpers the tests import (``tests/conftest.py`` holds only fixtures):

- ``services``: the shared RabbitMQ and PostgreSQL, settings for a test run, the ``postbote`` CLI
  and ``postbote worker`` as subprocesses, publishing jobs and waiting for their outcome.
- ``ledger``: reading the ledger and the dead-letter store while a test waits.
- ``faults``: private RabbitMQ and PostgreSQL instances to break, raw publishing, and the one
  assertion every fault test makes.
- ``smtp``: sinks started per test, what a sink received, a server entry and a tiny message.
- ``auth_sinks``: the account the authenticating sink accepts and ways to start it.
- ``observe``: a running worker's HTTP endpoints and metrics.
- ``dkim``: DKIM test messages, DNS answers and two independent verifiers (one is ``dkim_verify.pl``).
- ``ratelimit``: the series invariant and sender processes for the limiter tests.
- ``deploy``: reading the shipped deployment, dashboard and rule files.
"""
