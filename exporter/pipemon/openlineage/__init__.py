"""OpenLineage: RunEvents translated into records (`converter`), the facets pipemon reads (`facets`), and child
runs folded into their root run (`folding`)."""
