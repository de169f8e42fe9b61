"""OpenLineage beyond the core RunEvent: the facets pipemon reads (`facets`) and child runs folded into their
root run (`folding`). The endpoint itself, and the translation of events into records, is `pipemon.lineage`."""
