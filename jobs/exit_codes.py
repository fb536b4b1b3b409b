"""Exit codes the run and sweep commands share (usage errors exit 2, as click's do)."""

EXIT_POINT_FAILED = 2  # a point of a sweep could not run (conflicting output, unusable input)
EXIT_ROW_ERRORS = 3  # the run (every point of a sweep) finished, but some rows or input files could not be generated
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT
