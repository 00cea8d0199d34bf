"""Programs around the daemon: `bitnetctl` and the benchmarks."""
