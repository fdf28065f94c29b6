"""Sending over SMTP: pooled, authenticated connections; smtplib's errors are classified here
and never leave this package."""

from worker.job.smtp.connect import open_connection
from worker.job.smtp.pool import SmtpPool, Staged
from worker.job.smtp.replies import Delivery, SmtpReply

__all__ = ["Delivery", "SmtpPool", "SmtpReply", "Staged", "open_connection"]
