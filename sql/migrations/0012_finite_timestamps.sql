-- chunkd schema version 12: no timestamp column holds ±infinity.
--
-- PostgreSQL accepts 'infinity' and '-infinity' in a timestamptz; Python has no such datetime,
-- and asyncpg reads them as datetime.max and datetime.min without a time zone, which cannot be
-- compared with or subtracted from a real (aware) time: a daemon's scheduler crashed on every
-- pass (TypeError) once a schedule's cron could not be read, because plan_schedule() parked it
-- at next_fire_at = 'infinity' (issue #21, K17). A schedule the daemons cannot plan now keeps
-- next_fire_at NULL with the reason in last_error (sql/functions/schedules.sql), the ones
-- parked before are moved to that here, and every timestamp column of schema chunkd refuses
-- ±infinity, so no statement, view or JSON document of chunkd can hand one to its readers (the
-- daemon, the CLI, the dashboard, an application's own queries): a value that does not fit is
-- refused where it is written, in one line that names the column.
--
-- The checks are added NOT VALID here (a short lock per table, no scan); migration 13 validates
-- the rows already stored without blocking writes.

-- Every table at once, in the lock order of docs/migrations.md (scheduled first, as every
-- claim takes it): taken one by one in another order, they waited for claims waiting for them.
LOCK TABLE chunkd.scheduled, chunkd.workers, chunkd.attempts, chunkd.jobs, chunkd.job_rates,
    chunkd.chunks, chunkd.kind_flow, chunkd.concurrency_limits, chunkd.events, chunkd.events_v1,
    chunkd.legacy_outcomes, chunkd.schedule_fires, chunkd.schedules, chunkd.schema_definitions,
    chunkd.schema_migrations IN ACCESS EXCLUSIVE MODE;

UPDATE chunkd.schedules SET next_fire_at = NULL WHERE NOT isfinite(next_fire_at);

ALTER TABLE chunkd.attempts
    ADD CONSTRAINT attempts_claimed_at_finite CHECK (
        claimed_at >= '0001-01-01 00:00+00' AND claimed_at < '10000-01-01 00:00+00') NOT VALID,
    ADD CONSTRAINT attempts_ended_at_finite CHECK (
        ended_at >= '0001-01-01 00:00+00' AND ended_at < '10000-01-01 00:00+00') NOT VALID,
    ADD CONSTRAINT attempts_lease_expires_at_finite CHECK (
        lease_expires_at >= '0001-01-01 00:00+00'
        AND lease_expires_at < '10000-01-01 00:00+00') NOT VALID;

ALTER TABLE chunkd.chunks
    ADD CONSTRAINT chunks_created_at_finite CHECK (
        created_at >= '0001-01-01 00:00+00' AND created_at < '10000-01-01 00:00+00') NOT VALID;

ALTER TABLE chunkd.concurrency_limits
    ADD CONSTRAINT concurrency_limits_changed_at_finite CHECK (
        changed_at >= '0001-01-01 00:00+00' AND changed_at < '10000-01-01 00:00+00') NOT VALID;

ALTER TABLE chunkd.events
    ADD CONSTRAINT events_at_finite CHECK (
        at >= '0001-01-01 00:00+00' AND at < '10000-01-01 00:00+00') NOT VALID;

ALTER TABLE chunkd.events_v1
    ADD CONSTRAINT events_v1_at_finite CHECK (
        at >= '0001-01-01 00:00+00' AND at < '10000-01-01 00:00+00') NOT VALID;

ALTER TABLE chunkd.job_rates
    ADD CONSTRAINT job_rates_refilled_at_finite CHECK (
        refilled_at >= '0001-01-01 00:00+00' AND refilled_at < '10000-01-01 00:00+00') NOT VALID,
    ADD CONSTRAINT job_rates_wake_at_finite CHECK (
        wake_at >= '0001-01-01 00:00+00' AND wake_at < '10000-01-01 00:00+00') NOT VALID;

ALTER TABLE chunkd.jobs
    ADD CONSTRAINT jobs_cancelled_at_finite CHECK (
        cancelled_at >= '0001-01-01 00:00+00' AND cancelled_at < '10000-01-01 00:00+00') NOT VALID,
    ADD CONSTRAINT jobs_created_at_finite CHECK (
        created_at >= '0001-01-01 00:00+00' AND created_at < '10000-01-01 00:00+00') NOT VALID,
    ADD CONSTRAINT jobs_finished_at_finite CHECK (
        finished_at >= '0001-01-01 00:00+00' AND finished_at < '10000-01-01 00:00+00') NOT VALID,
    ADD CONSTRAINT jobs_paused_at_finite CHECK (
        paused_at >= '0001-01-01 00:00+00' AND paused_at < '10000-01-01 00:00+00') NOT VALID,
    ADD CONSTRAINT jobs_run_at_finite CHECK (
        run_at >= '0001-01-01 00:00+00' AND run_at < '10000-01-01 00:00+00') NOT VALID,
    ADD CONSTRAINT jobs_started_at_finite CHECK (
        started_at >= '0001-01-01 00:00+00' AND started_at < '10000-01-01 00:00+00') NOT VALID;

ALTER TABLE chunkd.kind_flow
    ADD CONSTRAINT kind_flow_changed_at_finite CHECK (
        changed_at >= '0001-01-01 00:00+00' AND changed_at < '10000-01-01 00:00+00') NOT VALID,
    ADD CONSTRAINT kind_flow_paused_at_finite CHECK (
        paused_at >= '0001-01-01 00:00+00' AND paused_at < '10000-01-01 00:00+00') NOT VALID,
    ADD CONSTRAINT kind_flow_refilled_at_finite CHECK (
        refilled_at >= '0001-01-01 00:00+00' AND refilled_at < '10000-01-01 00:00+00') NOT VALID,
    ADD CONSTRAINT kind_flow_wake_at_finite CHECK (
        wake_at >= '0001-01-01 00:00+00' AND wake_at < '10000-01-01 00:00+00') NOT VALID;

ALTER TABLE chunkd.legacy_outcomes
    ADD CONSTRAINT legacy_outcomes_completed_at_finite CHECK (
        completed_at >= '0001-01-01 00:00+00' AND completed_at < '10000-01-01 00:00+00') NOT VALID,
    ADD CONSTRAINT legacy_outcomes_started_at_finite CHECK (
        started_at >= '0001-01-01 00:00+00' AND started_at < '10000-01-01 00:00+00') NOT VALID;

ALTER TABLE chunkd.schedule_fires
    ADD CONSTRAINT schedule_fires_due_at_finite CHECK (
        due_at >= '0001-01-01 00:00+00' AND due_at < '10000-01-01 00:00+00') NOT VALID,
    ADD CONSTRAINT schedule_fires_fired_at_finite CHECK (
        fired_at >= '0001-01-01 00:00+00' AND fired_at < '10000-01-01 00:00+00') NOT VALID;

ALTER TABLE chunkd.scheduled
    ADD CONSTRAINT scheduled_run_at_finite CHECK (
        run_at >= '0001-01-01 00:00+00' AND run_at < '10000-01-01 00:00+00') NOT VALID;

ALTER TABLE chunkd.schedules
    ADD CONSTRAINT schedules_created_at_finite CHECK (
        created_at >= '0001-01-01 00:00+00' AND created_at < '10000-01-01 00:00+00') NOT VALID,
    ADD CONSTRAINT schedules_last_fired_at_finite CHECK (
        last_fired_at >= '0001-01-01 00:00+00'
        AND last_fired_at < '10000-01-01 00:00+00') NOT VALID,
    ADD CONSTRAINT schedules_next_fire_at_finite CHECK (
        next_fire_at >= '0001-01-01 00:00+00' AND next_fire_at < '10000-01-01 00:00+00') NOT VALID,
    ADD CONSTRAINT schedules_paused_at_finite CHECK (
        paused_at >= '0001-01-01 00:00+00' AND paused_at < '10000-01-01 00:00+00') NOT VALID,
    ADD CONSTRAINT schedules_updated_at_finite CHECK (
        updated_at >= '0001-01-01 00:00+00' AND updated_at < '10000-01-01 00:00+00') NOT VALID;

ALTER TABLE chunkd.schema_definitions
    ADD CONSTRAINT schema_definitions_applied_at_finite CHECK (
        applied_at >= '0001-01-01 00:00+00' AND applied_at < '10000-01-01 00:00+00') NOT VALID;

ALTER TABLE chunkd.schema_migrations
    ADD CONSTRAINT schema_migrations_applied_at_finite CHECK (
        applied_at >= '0001-01-01 00:00+00' AND applied_at < '10000-01-01 00:00+00') NOT VALID;

ALTER TABLE chunkd.workers
    ADD CONSTRAINT workers_last_heartbeat_at_finite CHECK (
        last_heartbeat_at >= '0001-01-01 00:00+00'
        AND last_heartbeat_at < '10000-01-01 00:00+00') NOT VALID,
    ADD CONSTRAINT workers_started_at_finite CHECK (
        started_at >= '0001-01-01 00:00+00' AND started_at < '10000-01-01 00:00+00') NOT VALID;
