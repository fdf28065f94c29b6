"""Bounces that arrive after the server said 250: read, matched to their job and recipient, recorded.

One stage per module, in the order ``ingest`` runs them:

1. ``intake``: the reports as bytes, from a file, a Maildir or standard input; ``imap``: from the
   tenant's mailbox (``mailbox`` watches them all from the supervisor)
2. ``parse``: what a report says: RFC 3464 delivery status, or a non-standard report read by
   flufl.bounce, and the identifiers it carries back
3. ``match``: the job and recipient, from what the report carries (Message-ID, ``X-Postbote-*``,
   ENVID, VERP token), never guessed
4. ``classify``: the RFC 3463 class and how long the address is suppressed for
5. ``record``: the recipient's state, the job's status, the event and the suppression entry, in
   one transaction (``postbote_record_bounce``)

Mail that is no report, or matches nothing, is left where it was.
"""

from worker.bounces.ingest import Ingested, ingest_report

__all__ = ["Ingested", "ingest_report"]
