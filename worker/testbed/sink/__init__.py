"""The embedded SMTP sink (aiosmtpd) used by the demo and the tests."""

from worker.testbed.sink.server import Received, RecordingHandler, Sink, free_port, read_index

__all__ = ["Received", "RecordingHandler", "Sink", "free_port", "read_index"]
