-- Fills the capture with the query's rows (text COPY, one member per line).
COPY pg_temp.audience_capture (user_id, email, phone, name) FROM STDIN
