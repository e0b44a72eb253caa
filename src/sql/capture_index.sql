-- The capture's unique index on the user id; building it finds duplicate ids.
CREATE UNIQUE INDEX audience_capture_user_id ON pg_temp.audience_capture (user_id)
