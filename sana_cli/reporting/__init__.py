"""What a run tells people and programs: typed events, results, the progress display on stderr."""
