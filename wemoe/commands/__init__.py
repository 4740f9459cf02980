"""One module per CLI command: argument handling around the library calls."""
