-- Fills the capture with the query's rows (text COPY, one member, or user with a value, per line).
COPY pg_temp.audience_capture (user_id, email, phone, name, value) FROM STDIN
