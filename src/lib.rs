//! audience-sync: keeps Wigzo in step with audience membership computed by SQL queries.
pub mod embedded_pg;
pub mod receiver;
