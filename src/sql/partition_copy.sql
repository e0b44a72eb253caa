-- Fills a new partition with the query's rows (text COPY, one member per line).
COPY {table} (user_id, email, phone, name, value) FROM STDIN
