-- chunkd schema version 13: the timestamp checks of version 12 validated.
--
-- VALIDATE CONSTRAINT reads every row under a SHARE UPDATE EXCLUSIVE lock: daemons keep
-- claiming and writing meanwhile. Each check takes a time from 0001-01-01 to before
-- 10000-01-01 UTC, what Python's datetime holds. A row that holds ±infinity or a time outside
-- that range (set by hand: chunkd itself wrote only 'infinity', in schedules.next_fire_at,
-- which version 12 cleared) fails this migration, naming the check
-- (<table>_<column>_finite): give that row a real time, or NULL where the column allows it, and
-- run chunkd migrate again.

ALTER TABLE chunkd.attempts VALIDATE CONSTRAINT attempts_claimed_at_finite;
ALTER TABLE chunkd.attempts VALIDATE CONSTRAINT attempts_ended_at_finite;
ALTER TABLE chunkd.attempts VALIDATE CONSTRAINT attempts_lease_expires_at_finite;
ALTER TABLE chunkd.chunks VALIDATE CONSTRAINT chunks_created_at_finite;
ALTER TABLE chunkd.concurrency_limits VALIDATE CONSTRAINT concurrency_limits_changed_at_finite;
ALTER TABLE chunkd.events VALIDATE CONSTRAINT events_at_finite;
ALTER TABLE chunkd.events_v1 VALIDATE CONSTRAINT events_v1_at_finite;
ALTER TABLE chunkd.job_rates VALIDATE CONSTRAINT job_rates_refilled_at_finite;
ALTER TABLE chunkd.job_rates VALIDATE CONSTRAINT job_rates_wake_at_finite;
ALTER TABLE chunkd.jobs VALIDATE CONSTRAINT jobs_cancelled_at_finite;
ALTER TABLE chunkd.jobs VALIDATE CONSTRAINT jobs_created_at_finite;
ALTER TABLE chunkd.jobs VALIDATE CONSTRAINT jobs_finished_at_finite;
ALTER TABLE chunkd.jobs VALIDATE CONSTRAINT jobs_paused_at_finite;
ALTER TABLE chunkd.jobs VALIDATE CONSTRAINT jobs_run_at_finite;
ALTER TABLE chunkd.jobs VALIDATE CONSTRAINT jobs_started_at_finite;
ALTER TABLE chunkd.kind_flow VALIDATE CONSTRAINT kind_flow_changed_at_finite;
ALTER TABLE chunkd.kind_flow VALIDATE CONSTRAINT kind_flow_paused_at_finite;
ALTER TABLE chunkd.kind_flow VALIDATE CONSTRAINT kind_flow_refilled_at_finite;
ALTER TABLE chunkd.kind_flow VALIDATE CONSTRAINT kind_flow_wake_at_finite;
ALTER TABLE chunkd.legacy_outcomes VALIDATE CONSTRAINT legacy_outcomes_completed_at_finite;
ALTER TABLE chunkd.legacy_outcomes VALIDATE CONSTRAINT legacy_outcomes_started_at_finite;
ALTER TABLE chunkd.schedule_fires VALIDATE CONSTRAINT schedule_fires_due_at_finite;
ALTER TABLE chunkd.schedule_fires VALIDATE CONSTRAINT schedule_fires_fired_at_finite;
ALTER TABLE chunkd.scheduled VALIDATE CONSTRAINT scheduled_run_at_finite;
ALTER TABLE chunkd.schedules VALIDATE CONSTRAINT schedules_created_at_finite;
ALTER TABLE chunkd.schedules VALIDATE CONSTRAINT schedules_last_fired_at_finite;
ALTER TABLE chunkd.schedules VALIDATE CONSTRAINT schedules_next_fire_at_finite;
ALTER TABLE chunkd.schedules VALIDATE CONSTRAINT schedules_paused_at_finite;
ALTER TABLE chunkd.schedules VALIDATE CONSTRAINT schedules_updated_at_finite;
ALTER TABLE chunkd.schema_definitions VALIDATE CONSTRAINT schema_definitions_applied_at_finite;
ALTER TABLE chunkd.schema_migrations VALIDATE CONSTRAINT schema_migrations_applied_at_finite;
ALTER TABLE chunkd.workers VALIDATE CONSTRAINT workers_last_heartbeat_at_finite;
ALTER TABLE chunkd.workers VALIDATE CONSTRAINT workers_started_at_finite;
