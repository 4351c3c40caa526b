"""Tools around the library that it does not need at run time: the main command, the selection study,
the video-like workload generator, the report plots and the benchmarks. Each command has a console script."""
