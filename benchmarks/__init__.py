"""Benchmark scripts (each prints one JSON line); a regular package, so it wins over the top-level
`benchmarks` package that opacus installs into site-packages."""
