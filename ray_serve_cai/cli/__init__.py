"""The `ray-cai` command line: a thin layer over the library, one command per library call."""
