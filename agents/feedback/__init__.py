"""Where the preferences and demonstrations come from, and the pairs they label: fragment pairs and their buffer,
simulated and human teachers, the labelling page, the demonstration file format."""
