"""The command line, thin over the modules of the package."""
