"""Where the preferences and demonstrations come from: simulated and human teachers, the labelling page, the
demonstration file format."""
