//! Benchmark harness for audience-sync (being written): see BENCHMARKS.md.
fn main() {}
