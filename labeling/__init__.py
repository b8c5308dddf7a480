"""``erc label``: label a corpus of dialogues in bulk, in-process, against a running service, or
on a Ray cluster (docs/labelling.md). Tooling around the service, never imported by it."""
