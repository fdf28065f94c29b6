-- Crash safety and dead-letter tooling.
-- takeovers: how often a delivery found this job claimed by a worker that had died;
-- after settings.crash_loop_after such deaths the job is dead-lettered (crash_loop).
ALTER TABLE deliveries ADD COLUMN takeovers integer NOT NULL DEFAULT 0;

CREATE INDEX dead_letters_tenant ON dead_letters (tenant_id, dead_at);
CREATE INDEX dead_letters_reason ON dead_letters (reason, dead_at);
