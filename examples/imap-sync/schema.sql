-- The application's table: one row per message, keyed on (folder, uidvalidity, uid), the
-- identity IMAP guarantees (RFC 3501 §2.3.1.1): a page synced twice (a handler runs at least
-- once) updates the same rows instead of adding new ones.
CREATE TABLE IF NOT EXISTS imap_messages (
    folder      text NOT NULL,
    uidvalidity bigint NOT NULL,
    uid         bigint NOT NULL,
    message_id  text,
    subject     text,
    sender      text,
    sent_date   text,
    size_bytes  int,
    synced_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (folder, uidvalidity, uid)
);
