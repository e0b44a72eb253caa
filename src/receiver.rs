//! An in-process Wigzo-compatible receiver that records identify calls (stub, being written).
