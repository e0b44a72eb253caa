-- Core state of audience-sync: audiences, confirmed membership, runs, and the outbox of
-- changes still to deliver. Capture snapshots live in per-session temporary tables and are
-- not stored here: what persists is what Wigzo confirmed and what is still owed to it.

CREATE TABLE audiences (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The trait name sent to Wigzo. Fixed at creation: never updated.
    key         text NOT NULL UNIQUE CHECK (key ~ '^[a-z0-9]+(_[a-z0-9]+)*$' AND length(key) <= 128),
    name        text NOT NULL,
    query       text NOT NULL,
    schedule    text NOT NULL,
    -- True when the audience reads from a source other than this database (its URL stays in
    -- the config file: it may hold a password).
    external_source boolean NOT NULL DEFAULT false,
    enabled     boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- What Wigzo has confirmed, per (audience, user). Rows with member = false are users that
-- were confirmed as having left; they keep their version so a later re-entry gets a new
-- messageId.
CREATE TABLE synced_members (
    audience_id  bigint NOT NULL REFERENCES audiences (id),
    user_id      text NOT NULL,
    member       boolean NOT NULL,
    email        text,
    phone        text,
    name         text,
    -- Number of changes confirmed for this user in this audience.
    version      bigint NOT NULL,
    confirmed_at timestamptz NOT NULL,
    PRIMARY KEY (audience_id, user_id)
);

CREATE TABLE runs (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    audience_id  bigint NOT NULL REFERENCES audiences (id),
    kind         text NOT NULL CHECK (kind IN ('initial', 'incremental', 'full_resync')),
    status       text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'abandoned')),
    trigger      text NOT NULL DEFAULT 'manual',
    owner        text NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    members      bigint,
    added        bigint,
    removed      bigint,
    sent         bigint NOT NULL DEFAULT 0,
    failed       bigint NOT NULL DEFAULT 0,
    retried      bigint NOT NULL DEFAULT 0,
    skipped_rows bigint,
    error        text
);
CREATE INDEX runs_audience_started ON runs (audience_id, id DESC);

-- One live change per (audience, user): the next run's diff supersedes a stale one.
CREATE TABLE outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    audience_id     bigint NOT NULL REFERENCES audiences (id),
    user_id         text NOT NULL,
    member          boolean NOT NULL,
    email           text,
    phone           text,
    name            text,
    -- Deterministic per change: md5(audience, user, next version, value) as a uuid.
    message_id      uuid NOT NULL,
    -- The version the user's confirmed row will have once this change is confirmed.
    target_version  bigint NOT NULL,
    run_id          bigint NOT NULL REFERENCES runs (id),
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'failed', 'rejected')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_owner     text,
    lease_until     timestamptz,
    last_status     integer,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (audience_id, user_id)
);
CREATE INDEX outbox_claim ON outbox (audience_id, id) WHERE status = 'pending';

-- Every confirmed change, for history and dashboards.
CREATE TABLE membership_events (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    audience_id  bigint NOT NULL REFERENCES audiences (id),
    user_id      text NOT NULL,
    member       boolean NOT NULL,
    run_id       bigint NOT NULL,
    message_id   uuid NOT NULL,
    detected_at  timestamptz NOT NULL,
    confirmed_at timestamptz NOT NULL
);
CREATE INDEX membership_events_audience ON membership_events (audience_id, confirmed_at DESC);
