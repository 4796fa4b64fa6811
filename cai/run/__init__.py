"""The runs behind the commands, as a library: generate (resumable), judge, merge, export; each
prints nothing, takes callbacks, and returns a summary (`cai.api` wraps them for Python users)."""
