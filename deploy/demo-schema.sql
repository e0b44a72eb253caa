-- Demo shop tables for the example audiences in audience-sync.toml (the compose setup loads
-- this into its fresh PostgreSQL; scripts/check-deploy uses it to prove the queries are valid).
-- The tables start EMPTY on purpose: every member an audience finds is sent to the Wigzo
-- organization of WIGZO_ORG_TOKEN. To see members flow, insert rows of your own, e.g. the
-- commented block at the end (only with a token of a test organization).
CREATE TABLE IF NOT EXISTS users (
    id    bigint PRIMARY KEY,
    email text,
    phone text,
    name  text
);

CREATE TABLE IF NOT EXISTS orders (
    id           bigserial PRIMARY KEY,
    user_id      bigint NOT NULL REFERENCES users (id),
    completed_at timestamptz
);
CREATE INDEX IF NOT EXISTS orders_user_completed ON orders (user_id, completed_at);

-- Sample data: 100 users, each with an order between 0 and 99 days ago.
-- INSERT INTO users (id, email, phone)
--   SELECT i, 'user' || i || '@example.com', '+1555' || lpad(i::text, 7, '0')
--     FROM generate_series(1, 100) i;
-- INSERT INTO orders (user_id, completed_at)
--   SELECT i, now() - make_interval(days => i - 1) FROM generate_series(1, 100) i;
