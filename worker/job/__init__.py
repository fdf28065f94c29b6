"""One job's path, stage by stage, in the order ``actor`` runs them.

1. ``ledger``: claim the job (sent once), later record each attempt
2. ``accounts``: the tenant's settings from PostgreSQL, cached briefly, secrets unsealed and
   files confined to the tenant's secrets directory
   (``suppression``: a job to an address on the tenant's suppression list is held here)
3. ``senders``: which sender address the user may use
4. ``recipients``: who gets the mail, in which role (customer, clerk, archive)
5. ``compose``: the MIME message
6. ``signature``: the DKIM signature
7. ``ratelimit``: the tenant's series slot
8. ``smtp``: the SMTP transaction over pooled connections (``breaker``: after a refused login,
   the tenant's jobs wait instead of each trying to log in)
9. ``outcome``: each recipient's state and the job's status from them
10. ``deadletter``: a job that failed for good, kept for replay
"""
