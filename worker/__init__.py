"""postbote's worker: the job path, the runtime that drives it, and the operators' tools.

- ``worker.job``: one job's path through the stages, in the order ``job.actor`` runs them.
- ``worker.runtime``: broker, worker processes, supervisor, middleware, metrics, probes.
- ``worker.bounces``: bounce reports after the 250, read, matched to job and recipient, recorded.
- ``worker.tools``: what operators run: dead-letter queue, tenant file, DKIM keys, test mail, demo.
- ``worker.cli``: the ``postbote`` command, thin wrappers over the tools and the runtime.
- ``worker.testbed``: the SMTP sink and sample documents for the demo and the tests.
- Shared by all: ``settings``, ``errors``, ``vocabulary``, ``db``, ``logs``, and
  ``library_internals``: every use of a library's private parts, each with its guard test.
"""
