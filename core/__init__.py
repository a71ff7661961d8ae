"""Project-wide plumbing that every package may import and that imports none of them:
config errors and checks, atomic files, inter-process locks, content hashes."""
