//! A private, throwaway PostgreSQL cluster for the demo and tests (stub, being written).
